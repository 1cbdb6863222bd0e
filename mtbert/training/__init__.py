"""Training: build.py (model, data, optimizer), step.py, run.py (a run's state), resume.py and
checkpoint.py, weight_average.py, process.py (signals), run_lock.py, limits.py, evaluate.py;
multirun.py and ensemble.py run the trainer (mtbert/train.py) several times."""

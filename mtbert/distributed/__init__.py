"""Everything that knows there are several processes: accelerator.py (the launch's Accelerator,
DeepSpeed settings, the refusals of what is unproved), collectives.py (the one gate to
torch.distributed), replicas.py, engines/ (how a combined gradient reaches the optimizer)."""

"""The packaged real checkpoint on the real CS224N files learns measurably in a short run."""

import pytest

from conftest import read_metrics, run_main

pytestmark = pytest.mark.slow


def test_short_real_run_learns(data_dir, tmp_path):
    run = tmp_path / "run"
    assert run_main([f"--data.dir={data_dir}", f"--train.out_dir={run}", "--train.epochs=1", "--train.epoch_steps=50",
                     "--data.batch_size=16", "--train.lr=1e-4", "--data.max_eval=300", "--data.max_train=4000",
                     "--train.log_every=10", "--train.progress=false", "--heads.quora.kind=cross"]) == 0
    records = read_metrics(run)
    train = [r for r in records if r["split"] == "train"]
    dev = [r for r in records if r["split"] == "dev"]
    first, last = train[0], train[-1]
    for task in ("sst", "quora"):
        assert last[f"loss/{task}"] < first[f"loss/{task}"], f"{task} loss did not fall: {first} -> {last}"
    start, end = dev[0], dev[-1]
    assert end["sst/acc"] > start["sst/acc"] + 0.05
    assert end["quora/acc"] > start["quora/acc"]
    assert end["overall"] > start["overall"] + 0.03

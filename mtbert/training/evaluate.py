"""Dev metrics and prediction files in the CS224N format (header, then ``id , prediction``).

Evaluation is sharded across processes (equal-sized shards, padded by repeating the first
example, so ZeRO-3's collective forwards stay in step) and gathered on every rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


@torch.no_grad()
def predict(model, split, batch_size: int, device, autocast=None, collectives=None, rank: int = 0) -> list:
    """Predictions for every example of ``split`` (a TokenizedSplit), in order, on every rank."""
    was_training = model.training
    model.eval()
    n, world = len(split), collectives.world if collectives is not None else 1
    per_rank = -(-n // world)
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    mine += [0] * (per_rank - len(mine))  # padding, dropped below
    # Batches of similar length (sorted), predictions put back in order: far less padding.
    lengths = split.lengths()
    order = sorted(range(per_rank), key=lambda j: lengths[mine[j]])
    head = model.heads[split.task]
    preds = [None] * per_rank
    for s in range(0, per_rank, batch_size):
        chunk = order[s:s + batch_size]
        batch = split.batch([mine[j] for j in chunk], device)
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            out = model(split.task, batch)
        for j, p in zip(chunk, head.predict(out).tolist()):
            preds[j] = p
    if world > 1:
        preds = [p for part in collectives.gather_objects(preds) for p in part]
    model.train(was_training)
    return preds[:n]


def evaluate(model, splits: dict, specs: dict, batch_size: int, device, autocast=None, collectives=None, rank=0):
    """-> ({task: {metric: value}}, overall, {task: preds}) over the given dev splits."""
    metrics, all_preds = {}, {}
    for task, split in splits.items():
        preds = predict(model, split, batch_size, device, autocast, collectives, rank)
        metrics[task] = specs[task].metric(preds, split.labels.tolist())
        all_preds[task] = preds
    overall = sum(m["score"] for m in metrics.values()) / max(len(metrics), 1)
    return metrics, overall, all_preds


def format_prediction(value, regression: bool) -> str:
    return f"{value:.4f}" if regression else str(int(value))


def write_predictions(path: Path, header: str, ids: list, preds: list, regression: bool) -> None:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(f"id \t {header} \n")
            for i, p in zip(ids, preds):
                f.write(f"{i} , {format_prediction(p, regression)} \n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

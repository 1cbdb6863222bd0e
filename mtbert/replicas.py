"""Do all ranks hold the same parameters? A cheap end-of-run check that catches silent
divergence (e.g. a launch that started independent rank-0-of-1 processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """[3] float64: sum, sum of squares, and a position-weighted sum of all parameters."""
    out = torch.zeros(3, dtype=torch.float64)
    offset = 0
    for p in model.parameters():
        x = p.detach().double().flatten().cpu()
        w = torch.arange(offset, offset + x.numel(), dtype=torch.float64).remainder_(9973).add_(1)
        out += torch.stack([x.sum(), (x * x).sum(), (x * w).sum()])
        offset += x.numel()
    return out


def ranks_agree(model: torch.nn.Module, world: int) -> bool:
    """True if every rank's fingerprint equals rank 0's bit for bit (True for one process)."""
    if world == 1:
        return True
    mine = fingerprint(model)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    return all(torch.equal(everyone[0], f) for f in everyone)

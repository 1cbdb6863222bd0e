"""Do all ranks hold the same parameters? A cheap end-of-run check that catches silent
divergence (e.g. a launch that started independent rank-0-of-1 processes)."""

from __future__ import annotations

import torch

from mtbert.distributed.collectives import Collectives


@torch.no_grad()
def fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """[3] float64 on the parameters' device: sum, sum of squares, and a position-weighted sum."""
    params = list(model.parameters())
    out = torch.zeros(3, dtype=torch.float64, device=params[0].device)
    offset = 0
    for p in params:
        x = p.detach().double().flatten()
        w = torch.arange(offset, offset + x.numel(), dtype=torch.float64, device=x.device).remainder_(9973).add_(1)
        out += torch.stack([x.sum(), (x * x).sum(), (x * w).sum()])
        offset += x.numel()
    return out


def ranks_agree(model: torch.nn.Module, collectives: Collectives, method_state: dict | None = None) -> bool:
    """True if every rank's fingerprint equals rank 0's bit for bit (True for one process). The
    method's state (GradVac targets, Nash-MTL warm start, DWA/FAMO) is part of it: it must be
    computed from all-reduced values only."""
    fp = fingerprint(model)
    if method_state:
        state = torch.cat([v.reshape(-1) for _, v in sorted(method_state.items())]).to(fp.device)
        fp = torch.cat([fp, torch.stack([state.sum(), (state * state).sum()])])
    return collectives.all_equal(fp)

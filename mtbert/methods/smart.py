"""SMART smoothness-inducing adversarial regularisation (Jiang et al. 2020), per task.

    R = D(f(x + delta*), f(x)),   delta* from noise N(0, sigma^2) and `steps` ascent steps of
    size eta on D, normalised per example (infinity norm)

D is the symmetric KL for classification (softmax, or sigmoid for one logit) and the MSE
for regression. The loss of a task becomes L + lambda R. Perturbations are applied to the
word embeddings (the same place as the reference implementation), one per sentence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _divergence(adv: torch.Tensor, clean: torch.Tensor, regression: bool) -> torch.Tensor:
    adv, clean = adv.float(), clean.float()
    if regression:
        return F.mse_loss(adv, clean)
    if adv.dim() == 1:  # one logit: Bernoulli distributions
        adv, clean = torch.stack([-adv / 2, adv / 2], -1), torch.stack([-clean / 2, clean / 2], -1)
    la, lc = F.log_softmax(adv, -1), F.log_softmax(clean, -1)
    return (F.kl_div(la, lc, log_target=True, reduction="batchmean")
            + F.kl_div(lc, la, log_target=True, reduction="batchmean"))


def example_noise(embeds: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, seed: int) -> torch.Tensor:
    """N(0, 1) noise [B, T, H] drawn per example from (seed, example index) over its real
    tokens (zero on padding, which attention masks out): an example's noise does not depend
    on the batch it is in, so N ranks perturb exactly what 1 process perturbs."""
    B, T, H = embeds.shape
    out = torch.zeros(B, T, H)
    for j, (i, n) in enumerate(zip(index.tolist(), mask.sum(1).tolist())):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        out[j, :n] = torch.randn(n, H, generator=g)
    return out.to(embeds.device, embeds.dtype)


def smart_loss(model, task: str, batch: dict, clean_out: torch.Tensor, noise: float = 1e-5,
               step: float = 1e-3, steps: int = 1, seed: int = 0, head_only: bool = False) -> torch.Tensor:
    """The SMART regulariser R for one task batch (``model`` is the unwrapped MultitaskModel).
    seed: the step's noise seed (identical on every rank); head_only: the final term reaches
    the head alone (ARRP's head-only batches)."""
    regression = model.heads[task].regression
    word = model.encoder.emb.word
    keys = ["a_ids"] + (["b_ids"] if "b_ids" in batch else [])
    embeds = [word(batch[k]).detach() for k in keys]  # [B, T, H] each, constants
    deltas = [(example_noise(e, batch[k.replace("ids", "mask")], batch["index"], seed * 2 + j) * noise).requires_grad_()
              for j, (k, e) in enumerate(zip(keys, embeds))]
    target = clean_out.detach()
    for _ in range(steps):
        adv = model(task, batch, [e + d for e, d in zip(embeds, deltas)])
        grads = torch.autograd.grad(_divergence(adv, target, regression), deltas)
        with torch.no_grad():
            deltas = [(d + step * g / g.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1e-12))
                      for d, g in zip(deltas, grads)]
        deltas = [d.detach().requires_grad_() for d in deltas]
    # The final term back-propagates into the model (with the embedding lookup re-attached).
    adv = model(task, batch, [word(batch[k]) + d.detach() for k, d in zip(keys, deltas)], head_only=head_only)
    return _divergence(adv, clean_out, regression)

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


def smart_loss(model, task: str, batch: dict, clean_out: torch.Tensor, noise: float = 1e-5,
               step: float = 1e-3, steps: int = 1) -> torch.Tensor:
    """The SMART regulariser R for one task batch (``model`` is the unwrapped MultitaskModel)."""
    regression = model.heads[task].regression
    word = model.encoder.emb.word
    keys = ["a_ids"] + (["b_ids"] if "b_ids" in batch else [])
    embeds = [word(batch[k]).detach() for k in keys]  # [B, T, H] each, constants
    deltas = [(torch.randn_like(e) * noise).requires_grad_() for e in embeds]
    target = clean_out.detach()
    for _ in range(steps):
        adv = model(task, batch, [e + d for e, d in zip(embeds, deltas)])
        grads = torch.autograd.grad(_divergence(adv, target, regression), deltas)
        with torch.no_grad():
            deltas = [(d + step * g / g.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1e-12))
                      for d, g in zip(deltas, grads)]
        deltas = [d.detach().requires_grad_() for d in deltas]
    # The final term back-propagates into the model (with the embedding lookup re-attached).
    adv = model(task, batch, [word(batch[k]) + d.detach() for k, d in zip(keys, deltas)])
    return _divergence(adv, clean_out, regression)

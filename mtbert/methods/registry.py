"""Every multi-task method, one entry each: where it comes from, what it sets, where its parts
live, and what it refuses. Presets (``--preset NAME``), ``--help``, the labels of
``python -m mtbert.compare``, ``launch/compare_methods.py`` and the README's methods table
(``python -m mtbert.methods.registry`` prints it; a test keeps the README in step) read it.

A method is a set of config overrides over the plain joint run: the step (training/step.py) and the
phases (methods/phases.py) read those fields, so a method has no code path of its own beyond
the parts named here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class MethodSpec:
    title: str
    """Name in tables, legends and compare labels."""
    source: str
    """The seed report or paper it comes from."""
    overrides: tuple[str, ...]
    """What ``--preset NAME`` sets (and what identifies a run of this method in compare)."""
    parts: str
    """Where its code lives."""
    refuses: str = ""
    """What it refuses, and why (checked before any work)."""
    budget: Callable[[int], list[str]] = field(default=lambda s: [f"--train.epoch_steps={s}"])
    """Extra overrides for launch/compare_methods.py given the joint run's round-robin steps s,
    so every method sees the same number of training examples."""
    compare: bool = True
    """Run it in launch/compare_methods.py (the ensemble runs after PCGrad there)."""
    preset: bool = True
    """Offer ``--preset NAME`` (not for the ensemble: it is a command on a finished run)."""
    marks: tuple[str, ...] | None = None
    """What identifies a run of it in compare (``field=value`` / ``field!=value``); default: overrides."""

    @property
    def identity(self) -> tuple[str, ...]:
        return self.overrides if self.marks is None else self.marks


METHODS: dict[str, MethodSpec] = {
    "sum": MethodSpec(
        "sum (joint RR)", "seeds' joint-training baseline", (),
        "training/step.py summed path; distributed/engines/"),
    "mean": MethodSpec(
        "mean", "summed loss divided by the step's task count", ("--method.name=mean",),
        "training/step.py summed path"),
    "pcgrad": MethodSpec(
        "PCGrad (RR-PCGrad)", "Yu et al. 2020, Alg. 1; seeds: RR-PCGrad = PCGrad + round-robin",
        ("--method.name=pcgrad",),
        "optim/pcgrad.py (weights from the Gram), optim/aggregators/projection.py, optim/gradients.py (rows, reducers), "
        "training/step.py per-task path; distributed/engines/zero3.py (on ZeRO-3's gradient partitions)"),
    "gse": MethodSpec(
        "GSE", "seed 'An Exploration of Fine-Tuning Techniques on minBERT': PCGrad-mean update, then the plain sum",
        ("--method.name=gse",), "optim/aggregators/projection.py (_gse: two weight vectors); training/step.py runs both updates",
        ),
    "a_pcgrad": MethodSpec(
        "A-PCGrad", "seeds: PCGrad + annealed sampling (Stickland & Murray 2019)",
        ("--method.name=pcgrad", "--train.schedule=annealed"), "data/sampler.py (annealed_alpha) + pcgrad",
        budget=lambda s: ["--train.epochs=3", f"--train.epoch_steps={s}"]),
    "v_pcgrad": MethodSpec(
        "V-PCGrad", "seeds: PCGrad on batches drawn from the union of all tasks",
        ("--method.name=pcgrad", "--train.schedule=union"), "data/sampler.py (union, rank_slices) + pcgrad",
        budget=lambda s: ["--data.batch_size=96", f"--train.epoch_steps={s}"]),
    "arrp": MethodSpec(
        "ARRP", "seed 'Post-Op BERT': RR-PCGrad + extra largest-task batches (lambda, optional head-only)",
        ("--method.name=pcgrad", "--method.arrp_batches=20", "--method.arrp_freeze=all_but_head"),
        "methods/phases.py (ARRP phases); model/heads.py (head_only); training/step.py",
        "schedules other than round_robin", marks=("--method.arrp_batches!=0",),
        budget=lambda s: ["--train.epochs=2", f"--train.epoch_steps={s // 2 - s // 8}",
                          f"--method.arrp_batches={3 * s // 8}", "--method.arrp_weight=0.5",
                          "--method.arrp_freeze=none"]),
    "pairwise": MethodSpec(
        "pairwise", "seed 'MiniBERT: Training Jointly': task pairs in turn",
        ("--method.pairwise=true",), "methods/phases.py (pair phases)",
        "schedules other than round_robin",
        budget=lambda s: [f"--train.epoch_steps={3 * s // 2}"]),
    "smart": MethodSpec(
        "SMART", "Jiang et al. 2020 (seeds: SMART regularisation per task)", ("--method.smart=true",),
        "methods/smart.py (per-example noise); training/step.py adds it to each task loss"),
    "sequential": MethodSpec(
        "sequential", "seeds' forgetting baseline: one task after another", ("--train.schedule=sequential",),
        "methods/phases.py (one phase per task)"),
    "sharing": MethodSpec(
        "sharing F2-S2-I2", "seeds: hard parameter sharing (frozen / shared / per-task layers)",
        ("--model.sharing=F2-S2-I2",), "model/heads.py (MultitaskModel task_layers); optim/gradients.py "
        "(per-task layers are private rows)"),
    # -- beyond the seeds: the multi-task gradient methods (per-task path, weights from the Gram) --
    "pcgrad_layer": MethodSpec(
        "per-layer PCGrad", "Yu et al. 2020, per parameter block (one Gram per encoder layer)",
        ("--method.name=pcgrad", "--method.gram_blocks=layer"),
        "optim/gradients.py (block_ranges, block_gram: [L, K, K] in one collective); optim/aggregators/base.py "
        "(per_block)"),
    "mgda": MethodSpec(
        "MGDA", "Sener & Koltun 2018: min-norm point of the convex hull (exact for any K: an NNLS)",
        ("--method.name=mgda",), "optim/aggregators/min_norm.py (mgda_weights)"),
    "cagrad": MethodSpec(
        "CAGrad", "Liu et al. 2021: conflict-averse gradient (c = method.cagrad_c)",
        ("--method.name=cagrad",), "optim/aggregators/min_norm.py (cagrad_weights: the inner problem solved exactly over the faces of the hull)",
        ),
    "imtl_g": MethodSpec(
        "IMTL-G", "Liu et al. 2021: equal projections on every unit task gradient (closed form)",
        ("--method.name=imtl_g",), "optim/aggregators/closed_form.py"),
    "aligned_mtl": MethodSpec(
        "Aligned-MTL", "Senushkin et al. 2023: aligned singular values (eigendecomposition of the Gram)",
        ("--method.name=aligned_mtl",), "optim/aggregators/closed_form.py"),
    "upgrad": MethodSpec(
        "UPGrad", "Quinton & Rey 2024 (torchjd): mean of the projections onto the dual cone",
        ("--method.name=upgrad",), "optim/aggregators/min_norm.py (NNLS per task)"),
    "dualproj": MethodSpec(
        "DualProj", "Quinton & Rey 2024 (torchjd): the mean gradient projected onto the dual cone",
        ("--method.name=dualproj",), "optim/aggregators/min_norm.py"),
    "nash_mtl": MethodSpec(
        "Nash-MTL", "Navon et al. 2022: Nash bargaining weights (M a = 1/a; state: the warm start)",
        ("--method.name=nash_mtl",), "optim/aggregators/nash.py (Newton on the convex potential)",
        "method.gram_blocks=layer (one bargaining problem per step)"),
    "gradvac": MethodSpec(
        "GradVac", "Wang et al. 2021: gradient vaccine (EMA cosine targets per task pair; state)",
        ("--method.name=gradvac",), "optim/aggregators/projection.py (_gradvac; targets [L, K, K] in the state)",
        ),
    "fairgrad": MethodSpec(
        "FairGrad", "Ban & Ji 2024: alpha-fair utilities, M w = w^(-1/alpha) (alpha 1 = Nash-MTL; state: warm start)",
        ("--method.name=fairgrad",), "optim/aggregators/nash.py (fair_weights: Newton on the convex potential)",
        "method.gram_blocks=layer (one problem per step)"),
    "config": MethodSpec(
        "ConFIG", "Liu, Chu & Thuerey 2025: equal positive cosines to every task gradient (U^+ 1), length the "
        "projections' sum", ("--method.name=config",), "optim/aggregators/conditioned.py (config_weights)"),
    "pcd": MethodSpec(
        "PCD", "Varam & AlHajri 2026: priority-constrained descent (the first task primary; state: norm EMA)",
        ("--method.name=pcd",), "optim/aggregators/conditioned.py (pcd_solve: exact over the active sets)",
        "method.gram_blocks=layer (one problem per step)"),
    "sdmgrad": MethodSpec(
        "SDMGrad", "Xiao, Ban & Ji 2023: direction-oriented MGDA (lambda towards the mean; state: warm start)",
        ("--method.name=sdmgrad",), "optim/aggregators/stochastic.py (sdmgrad_step, simplex_projection)",
        "method.gram_blocks=layer (one problem per step)"),
    "modo": MethodSpec(
        "MoDo", "Chen et al. 2023: one projected step of the MGDA weights per step (state: the weights)",
        ("--method.name=modo",), "optim/aggregators/stochastic.py (modo_step)",
        "method.gram_blocks=layer (one problem per step)"),
    "cr_mogm": MethodSpec(
        "CR-MOGM", "Zhou et al. 2022: a moving average of MGDA's (or method.cr_mogm_inner's) weights (state)",
        ("--method.name=cr_mogm",), "optim/aggregators/stochastic.py (_cr_mogm)",
        "method.gram_blocks=layer; a stateful inner method"),
    "gradnorm": MethodSpec(
        "GradNorm", "Chen et al. 2018: learnable weights equalising w_i ||g_i|| at loss-ratio targets (state)",
        ("--method.name=gradnorm",), "optim/aggregators/stochastic.py (gradnorm_move); training/step.py (global losses)",
        "method.gram_blocks=layer (one problem per step)"),
    "krum": MethodSpec(
        "Krum", "Blanchard et al. 2017: (Multi-)Krum, the gradient(s) closest to their neighbours",
        ("--method.name=krum",), "optim/aggregators/robust.py (krum_weights)"),
    "trimmed_mean": MethodSpec(
        "TrimmedMean", "Yin et al. 2018: coordinate-wise trimmed mean of the task gradients",
        ("--method.name=trimmed_mean",), "optim/aggregators/robust.py (columns: on the rows where they lie)",
        "method.gram_blocks=layer (not a Gram method)"),
    "graddrop": MethodSpec(
        "GradDrop", "Chen et al. 2020: gradient sign dropout, one draw per global coordinate",
        ("--method.name=graddrop",), "optim/aggregators/robust.py (columns; coordinate_uniform: a counter-based "
        "hash); engines' coordinates()", "method.gram_blocks=layer (not a Gram method)"),
    "excess_mtl": MethodSpec(
        "ExcessMTL", "He et al. 2024: weights grow with each task's excess risk (AdaGrad's diagonal; per-coordinate "
        "state)", ("--method.name=excess_mtl",), "optim/aggregators/tracking.py (column state beside the rows, "
        "checkpointed per rank)", "method.gram_blocks=layer (not a Gram method)"),
    "moco": MethodSpec(
        "MoCo", "Fernando et al. 2023: tracked gradient estimates Y and their weights; the update is lambda^T Y",
        ("--method.name=moco",), "optim/aggregators/tracking.py (Y beside the rows, checkpointed per rank)",
        "method.gram_blocks=layer (not a Gram method)"),
    "db_mtl": MethodSpec(
        "DB-MTL", "Lin et al. 2023: log-loss gradients averaged, scaled to the largest norm",
        ("--method.name=db_mtl",), "optim/aggregators/tracking.py (buffers beside the rows, checkpointed per rank)",
        "method.gram_blocks=layer (not a Gram method)"),
    # -- loss weighting: no per-task gradients, the summed path --
    "rlw": MethodSpec(
        "RLW", "Lin et al. 2022: random loss weights, softmax of N(0, I) per step",
        ("--method.name=rlw",), "optim/loss_weighting.py"),
    "uw": MethodSpec(
        "UW", "Kendall et al. 2018: uncertainty weighting (learnable log-variances)",
        ("--method.name=uw",), "optim/loss_weighting.py; model/heads.py (loss_log_vars)"),
    "dwa": MethodSpec(
        "DWA", "Liu et al. 2019: dynamic weight average (loss ratios of the last two windows; state)",
        ("--method.name=dwa",), "optim/loss_weighting.py",
        budget=lambda s: [f"--train.epoch_steps={s}", f"--method.dwa_window={max(1, s // 6)}"]),
    "famo": MethodSpec(
        "FAMO", "Liu et al. 2023: fast adaptive multitask optimisation (task logits; state)",
        ("--method.name=famo",), "optim/loss_weighting.py; training/step.py (_losses_after_update)",
        "method.smart (FAMO re-evaluates the plain task losses)"),
    "gls": MethodSpec(
        "GLS", "Chennupati et al. 2019: geometric loss strategy, exp(mean log L_k)",
        ("--method.name=gls",), "optim/loss_weighting.py (gls_coefficients)"),
    "stch": MethodSpec(
        "STCH", "Lin et al. 2024: smooth Tchebycheff scalarisation of the log losses after a warm-up (state: nadir)",
        ("--method.name=stch",), "optim/loss_weighting.py (stch_coefficients)",
        budget=lambda s: [f"--train.epoch_steps={s}", f"--method.stch_warmup={max(1, s // 6)}"]),
    "ensemble": MethodSpec(
        "ensemble (PCGrad + per-task fine-tune)", "seeds: per-task fine-tunes of a joint model, ensembled",
        (), "training/ensemble.py (python -m mtbert.training.ensemble RUN_DIR)", compare=False, preset=False, marks=()),
}

ALIASES = {"rr_pcgrad": ("pcgrad", ["--train.schedule=round_robin"]), "mops": ("sharing", [])}
"""Older preset names, kept working."""


def method_presets() -> dict[str, list[str]]:
    out = {name: list(spec.overrides) for name, spec in METHODS.items() if spec.preset}
    out.update({alias: [*METHODS[name].overrides, *extra] for alias, (name, extra) in ALIASES.items()})
    return out


def _holds(cfg: dict, mark: str) -> bool:
    """``section.field=value`` or ``section.field!=value`` against a config dict."""
    negate = "!=" in mark
    path, _, text = mark.lstrip("-").replace("!=", "=").partition("=")
    actual = cfg
    for key in path.split("."):
        actual = actual.get(key) if isinstance(actual, dict) else None
    if isinstance(actual, bool):
        same = str(actual).lower() == text.lower()
    elif isinstance(actual, (int, float)):
        try:
            same = float(actual) == float(text)
        except ValueError:
            same = False
    else:
        same = str(actual) == text
    return same != negate


def label(cfg: dict) -> str:
    """The methods a run's config.json shows, by title: every entry whose marks all hold,
    less those whose marks are contained in another matching entry's (A-PCGrad, not
    "PCGrad + A-PCGrad"); the plain joint run when none does; plus a task schedule that no
    matched entry sets (e.g. "PCGrad (RR-PCGrad) + temperature")."""
    hits = {n: set(s.identity) for n, s in METHODS.items() if s.identity and all(_holds(cfg, m) for m in s.identity)}
    keep = [n for n in hits if not any(o != n and hits[n] < hits[o] for o in hits)]
    title = " + ".join(METHODS[n].title for n in keep) or METHODS["sum"].title
    schedule = cfg.get("train", {}).get("schedule", "round_robin")
    if schedule != "round_robin" and not any(m.startswith("--train.schedule=") for n in keep for m in hits[n]):
        title = f"{title.replace(' (joint RR)', '')} + {schedule}"  # a schedule no matched entry sets
    return title


def markdown_table() -> str:
    lines = ["| method (`--preset`) | from | sets | code | refuses |", "|---|---|---|---|---|"]
    # (the ensemble has no preset: python -m mtbert.training.ensemble RUN_DIR)
    for name, s in METHODS.items():
        sets = " ".join(f"`{o}`" for o in s.overrides) or "—"
        lines.append(f"| **{s.title}** (`{name}`) | {s.source} | {sets} | {s.parts} | {s.refuses or '—'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())

"""Typed run configuration: dataclasses with a docstring per field, presets, dotted overrides.

    python mtbert/train.py --preset recipe --train.lr=3e-5 --data.tasks=sst,sts
    python mtbert/train.py --config my_run.yaml --heads.sts.kind=cosine

Precedence: defaults < preset < --config file < command-line overrides. Every value is
checked before any work starts; an error names the field (``train.lr``) and what is wrong.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mtbert.errors import ConfigError, UserError  # noqa: F401 - ConfigError: where callers have imported it from
from mtbert.presets import PRESETS

DATA_DIR_ENV = "MTBERT_DATA_DIR"


@dataclass
class HeadCfg:
    """How one task's prediction head is built (``--heads.<task>.<field>``)."""

    kind: str = "auto"
    """Head type. Single-sentence tasks: `linear`. Pair tasks: `bi` ([u; v; |u-v|; u*v]),
    `cos2d` ([u; v; cos(u,v)], the seeds' "2d+1" head), `cosine` (cos(u,v) scaled to the label
    range, regression only) or `cross` (both sentences in one sequence). `auto`: the task's default."""
    pooling: str = "mean"
    """Sentence vector from token states: `cls`, `mean` (over non-padding tokens; how the packaged
    MiniLM was trained) or `max`."""
    layers: int = 1
    """1 = one linear layer; 2 = linear-GELU-linear (the seeds' "large heads")."""
    loss: str = "auto"
    """`ce`, `bce`, `mse`, or `cosine_embedding` (cosine head only). `auto`: the task's default."""
    dropout: float = 0.1
    """Dropout on the pooled features before the head."""
    weight: float = 1.0
    """Weight of this task's loss (its gradient, under PCGrad) in the multitask objective."""


@dataclass
class TaskDefCfg:
    """A user-defined task (``--task_defs.<name>.<field>``); add its name to ``data.tasks``."""

    kind: str = "single_classification"
    """`single_classification`, `pair_classification` or `pair_regression`."""
    num_labels: int = 2
    """Classes for classification tasks (2 means one logit + BCE by default)."""
    label_min: float = 0.0
    """Regression label range, lower end (used by the cosine head)."""
    label_max: float = 1.0
    """Regression label range, upper end."""
    source: str = "cs224n"
    """`cs224n` (tab-separated course files) or `hub` (a Hugging Face dataset)."""
    train: str = ""
    """cs224n: train file (relative to data.dir or absolute). hub: the split name."""
    dev: str = ""
    """cs224n: dev file. hub: the split name."""
    test: str = ""
    """cs224n: unlabeled test file (optional). hub: the split name (optional)."""
    hub_name: str = ""
    """hub: dataset name, e.g. `glue`."""
    hub_config: str = ""
    """hub: dataset config, e.g. `stsb`."""
    columns: str = ""
    """Column mapping `role:column,...` with roles id, text_a, text_b, label,
    e.g. `text_a:sentence1,text_b:sentence2,label:label,id:idx`."""


@dataclass
class ModelCfg:
    checkpoint: str = "minilm-l6"
    """HF BERT checkpoint: `minilm-l6` (packaged all-MiniLM-L6-v2), a local folder, or a hub id
    such as `bert-base-uncased` (needs network the first time)."""
    encoder: str = "finetune"
    """`finetune` (train everything) or `frozen` (train the heads only; use lr ~1e-3)."""
    sharing: str = ""
    """Hard parameter sharing topology `F<a>-S<b>-I<c>` (frozen bottom, shared middle, per-task
    top layers; a+b+c = number of layers), e.g. `F2-S2-I2`. Empty: all layers shared."""
    dropout: float = -1.0
    """Override the checkpoint's hidden/attention dropout (-1 keeps the checkpoint's)."""
    max_length: int = 128
    """Tokens per sentence (pairs in a cross-encoder share this budget)."""
    init_weights: str = ""
    """Start from these MultitaskModel weights (a run's best/model.safetensors), e.g. to fine-tune
    a multitask model per task (mtbert.methods.ensemble)."""


@dataclass
class DataCfg:
    dir: str = ""
    """Folder with the CS224N task files. Empty: $MTBERT_DATA_DIR, else the packaged sample."""
    tasks: list[str] = field(default_factory=lambda: ["sst", "quora", "sts"])
    """Tasks trained jointly, comma-separated: built-in sst, cfimdb, quora, sts, or names from task_defs."""
    batch_size: int = 32
    """Examples per task batch on each process (global batch = this x processes)."""
    eval_batch_size: int = 128
    """Examples per evaluation batch."""
    bucket: bool = True
    """Length-bucketed batches (less padding); off = random batches."""
    max_train: int = 0
    """Use at most this many training examples per task (0 = all)."""
    max_eval: int = 0
    """Evaluate on at most this many dev examples per task (0 = all)."""
    skip_bad_rows: bool = False
    """Skip malformed rows (reported per file) instead of stopping with the file and line."""


@dataclass
class TrainCfg:
    out_dir: str = "runs/default"
    """Run directory: config.json, metrics.jsonl, predictions/, checkpoints/."""
    seed: int = 0
    """Seed for weights of new layers, dropout, shuffling and the PCGrad order."""
    epochs: int = 3
    """Training epochs (stages per task when schedule=sequential)."""
    train_tasks: list[str] = field(default_factory=list)
    """Train only these of data.tasks (all are still evaluated); empty = all."""
    epoch_steps: str = "largest"
    """Steps per epoch: `smallest` / `largest` / `sum` (of the tasks' batches per epoch), a multiple
    such as `2*smallest`, or an integer."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0 = no limit)."""
    lr: float = 5e-5
    """Peak learning rate of the encoder (MiniLM-size models like 1e-4; bert-base 2e-5 to 5e-5)."""
    head_lr: float = 0.0
    """Learning rate of heads and per-task layers (0 = same as lr)."""
    layer_lr_decay: float = 1.0
    """Layer-wise lr decay d in (0, 1]: encoder layer l of L gets lr * d^(L + 1 - l), the embeddings
    lr * d^(L + 1), a per-task top layer head_lr (or lr) * d^(L + 1 - l), heads head_lr (1: no decay)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""
    warmup: float = 0.1
    """Warmup as a fraction of the total steps."""
    lr_schedule: str = "linear"
    """After warmup: `linear` decay to 0, `cosine`, or `constant`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    grad_accum: int = 1
    """Accumulate this many task-batch rounds per optimizer step."""
    schedule: str = "round_robin"
    """Task schedule: `round_robin` (a batch of every task each step), `proportional`, `annealed`,
    `temperature`, `union` (one batch drawn from all tasks' data), `sequential` (one task after another)."""
    temperature: float = 2.0
    """T of the temperature schedule (p ~ N^(1/T))."""
    eval_every: int = 0
    """Evaluate on dev every this many steps (0 = at the end of each epoch)."""
    eval_at_start: bool = True
    """Evaluate on dev before the first step (the untrained baseline). Off: one dev pass less per
    run, for sweeps of short runs (the equivalence tests run ~350)."""
    log_every: int = 10
    """Write a train metrics line every this many steps."""
    keep_last: int = 2
    """Training-state checkpoints kept (the best model is kept separately)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps (0 = at each evaluation)."""
    resume: bool = True
    """Resume from the newest checkpoint in out_dir if there is one."""
    max_bad_steps: int = 5
    """Stop when this many steps in a row had a NaN/inf loss or gradient (they are skipped)."""
    idle_params: str = "auto"
    """Parameters with no gradient in a step (an absent task's head, an encoder frozen by ARRP's
    head-only batches): `keep` (grad None: AdamW leaves them alone), `step` (zero gradient: AdamW
    still applies momentum and weight decay), `auto` = `step` under DeepSpeed (its flat ZeRO
    optimizers always step every parameter; `keep` is refused there) and `keep` elsewhere."""
    precision: str = "auto"
    """`auto` (from the accelerate config / launch flags), `no` (fp32), `bf16`, or `fp16`: fp16
    autocast over fp32 weights with mtbert's dynamic loss scale, on every device and engine (a step
    whose gradients overflow is skipped and the scale halved; docs/fp16.md)."""
    fp16_loss_scale: float = 65536.0
    """fp16's initial loss scale (halved at every overflow, doubled after 2000 good steps in a row)."""
    ema_decay: float = 0.0
    """Evaluate, keep as best, save as final and predict with an exponential moving average of
    the weights, this decay per optimizer step (warmed up: min(decay, (1+t)/(10+t))); the
    optimizer steps the raw weights. 0 = off. Refused under ZeRO-3 (partitioned parameters). Costs
    one fp32 pass over the parameters per step (4% of the recipe's throughput on a 2-core CPU),
    and gave nothing at the end of the linearly decayed recipe (docs/recipe30-2026-12-02.md)."""
    compile: bool = False
    """torch.compile the encoder (dynamic shapes: one graph for all sequence lengths). Off by
    default: measured slower end to end on the 2-core CPU (README, `mtbert.bench --parts compile`)."""
    progress: bool = True
    """tqdm progress bar on the main process."""
    predict_test: bool = True
    """Write the test splits' predictions at the end (off for method comparisons and sweeps, which
    read dev metrics only: the full test files take minutes on a CPU)."""


@dataclass
class MethodCfg:
    name: str = "sum"
    """How the tasks are combined. Summed path (one backward): `sum`, `mean`, `rlw` (random loss
    weights), `uw` (uncertainty weighting), `dwa` (dynamic weight average), `famo`, `gls`
    (geometric mean of the losses), `stch` (smooth Tchebycheff). Per-task gradients (K backwards,
    weights from their Gram matrix): `pcgrad`, `gse` (mean of projected, then a second update
    with the plain combined gradient), `mgda`, `cagrad`, `imtl_g`, `aligned_mtl`, `upgrad`,
    `dualproj`, `nash_mtl`, `gradvac`, `fairgrad`, `config` (ConFIG), `pcd` (priority-constrained
    descent), `sdmgrad`, `modo`, `cr_mogm`, `gradnorm`, `krum`; coordinate-wise on the per-task
    gradients: `trimmed_mean`, `graddrop`, and with per-coordinate state `excess_mtl`, `moco`,
    `db_mtl`. Sources: --help's method list."""
    pcgrad_reduction: str = "sum"
    """PCGrad update: `sum` of projected gradients (Yu et al. 2020) or `mean`."""
    reducer: str = "allreduce"
    """Multi-process per-task gradient reduction: `allreduce` ([K,P] in buckets) or `sharded`
    (reduce-scatter + K x K Gram all-reduce). Under ZeRO-3 neither: the engine's own
    reduce-scatter leaves each rank its partition, and only the K x K Gram is all-reduced."""
    gram_blocks: str = "whole"
    """Per-task methods: `whole` (one Gram over all shared parameters) or `layer` (one Gram per
    block: the embeddings, each encoder layer, the rest; each block gets its own weights: per-layer
    PCGrad, GradVac's per-layer targets). Not with nash_mtl (one solve per step)."""
    cagrad_c: float = 0.5
    """CAGrad's c: the update stays within c ||g0|| of the mean gradient g0 (Liu et al. 2021)."""
    cagrad_rescale: int = 1
    """CAGrad's rescale of the authors' code: 0 none, 1 divide by 1 + c^2, 2 divide by 1 + c."""
    gradvac_beta: float = 0.01
    """GradVac's EMA rate of the per-pair cosine targets (Wang et al. 2021 use 1e-2)."""
    dwa_temperature: float = 2.0
    """DWA's temperature T (Liu et al. 2019 use 2)."""
    dwa_window: int = 50
    """DWA: steps per loss-averaging window (the paper's is an epoch)."""
    famo_lr: float = 0.025
    """FAMO: Adam learning rate of the task logits xi (the authors' default)."""
    famo_decay: float = 0.01
    """FAMO: gamma, the L2 decay of xi (the authors' default)."""
    fairgrad_alpha: float = 2.0
    """FairGrad's alpha: utilities g_i . d = w_i^(-1/alpha) (1: Nash-MTL's bargaining; 0: the mean;
    Ban & Ji 2024 report 2 on most benchmarks)."""
    pcd_tau: float = 0.02
    """PCD: each secondary task keeps at least this fraction of its (normalised) squared gradient
    norm along the update; the primary is the first task in data.tasks."""
    sdmgrad_lambda: float = 0.3
    """SDMGrad's lambda: pull of the weights towards the uniform preference (the authors' 0.3)."""
    modo_gamma: float = 0.1
    """MoDo: step size of the weights' projected-gradient step (torchjd's 0.1)."""
    modo_rho: float = 0.1
    """MoDo: rho, the weights' L2 regulariser (torchjd's 0.1)."""
    cr_mogm_alpha: float = 0.9
    """CR-MOGM: weight of the previous step's weights in their moving average."""
    cr_mogm_inner: str = "mgda"
    """CR-MOGM: the method whose weights are averaged (a stateless per-task method)."""
    gradnorm_alpha: float = 1.5
    """GradNorm's alpha: how strongly a task's relative loss raises its target norm (the paper's 1.5)."""
    gradnorm_lr: float = 0.025
    """GradNorm: step size of the task weights on the balancing loss."""
    krum_byzantine: int = 0
    """Krum's f: task gradients assumed adversarial (needs f + 3 tasks in a step)."""
    krum_selected: int = 1
    """Multi-Krum: how many of the best-scored task gradients are averaged."""
    trim: int = 1
    """TrimmedMean: values dropped at each end per coordinate (at most (k - 1) // 2)."""
    excess_eta: float = 1.0
    """ExcessMTL: the robust step size eta of the weights' multiplicative update (torchjd's 1)."""
    moco_gamma: float = 0.1
    """MoCo: step size of the weights (decayed as 1/sqrt(t); LibMTL's and torchjd's 0.1)."""
    moco_rho: float = 0.0
    """MoCo: rho, the weights' L2 regulariser (LibMTL's and torchjd's 0)."""
    dbmtl_beta: float = 0.9
    """DB-MTL: the EMA rate of the log-loss gradient buffers (LibMTL's 0.9)."""
    stch_mu: float = 1.0
    """STCH: the smoothing mu of the Tchebycheff scalarisation (Lin et al. 2024 use 1)."""
    stch_warmup: int = 50
    """STCH: steps of summed log losses whose mean losses become the nadir point (the authors:
    four epochs)."""
    uw_lr: float = 0.01
    """UW: learning rate of the log-variances s_k (AdamW group of their own, no weight decay;
    at fine-tuning rates like 1e-4 they would barely move)."""
    conflict_stats: bool = True
    """Log gradient-conflict statistics (pairwise cosines, conflict fraction, norm ratio)."""
    smart: bool = False
    """SMART adversarial regularisation on every task."""
    smart_weight: float = 5.0
    """lambda of SMART."""
    smart_step: float = 1e-3
    """eta: ascent step size on the perturbation."""
    smart_noise: float = 1e-5
    """sigma: initial perturbation noise."""
    smart_steps: int = 1
    """Ascent steps."""
    arrp_batches: int = 0
    """ARRP: extra batches of the largest task after every epoch (0 = off)."""
    arrp_weight: float = 1.0
    """ARRP: loss scale lambda of the extra batches."""
    arrp_freeze: str = "none"
    """ARRP: `none`, or `all_but_head` (only that task's head trains in the extra batches)."""
    pairwise: bool = False
    """Pairwise joint training: each epoch trains the task pairs in turn (SST+Quora, Quora+STS, STS+SST)."""


@dataclass
class LogCfg:
    wandb: bool = False
    """Track with Weights & Biases (WANDB_MODE=offline works without network)."""
    project: str = "mtbert"
    """W&B project."""
    group: str = ""
    """W&B group (a sweep's name)."""
    name: str = ""
    """Run name (default: the out_dir's last part)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags (the method is always added)."""


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    method: MethodCfg = field(default_factory=MethodCfg)
    log: LogCfg = field(default_factory=LogCfg)
    heads: dict[str, HeadCfg] = field(default_factory=dict)
    task_defs: dict[str, TaskDefCfg] = field(default_factory=dict)


# The methods (their registries: optim/loss_weighting.py, optim/aggregators/; a test keeps these in step).
LOSS_METHODS = ("sum", "mean", "rlw", "uw", "dwa", "famo", "gls", "stch")  # summed path: one backward
GRADIENT_METHODS = ("pcgrad", "gse", "mgda", "cagrad", "imtl_g", "aligned_mtl", "upgrad", "dualproj", "nash_mtl",
                    "gradvac", "fairgrad", "config", "pcd", "sdmgrad", "modo", "cr_mogm", "gradnorm", "krum",
                    "trimmed_mean", "graddrop", "excess_mtl", "moco", "db_mtl")  # per-task gradients


def per_task(method_name: str) -> bool:
    return method_name in GRADIENT_METHODS


CHOICES = {
    "model.encoder": {"finetune", "frozen"},
    "train.lr_schedule": {"linear", "cosine", "constant"},
    "train.precision": {"auto", "no", "bf16", "fp16"},
    "train.idle_params": {"auto", "keep", "step"},
    "train.schedule": {"round_robin", "proportional", "annealed", "temperature", "union", "sequential"},
    "method.name": {*LOSS_METHODS, *GRADIENT_METHODS},
    "method.gram_blocks": {"whole", "layer"},
    "method.cagrad_rescale": {0, 1, 2},
    "method.pcgrad_reduction": {"sum", "mean"},
    "method.reducer": {"allreduce", "sharded"},
    "method.arrp_freeze": {"none", "all_but_head"},
    "heads.*.kind": {"auto", "linear", "bi", "cos2d", "cosine", "cross"},
    "heads.*.pooling": {"cls", "mean", "max"},
    "heads.*.loss": {"auto", "ce", "bce", "mse", "cosine_embedding"},
    "task_defs.*.kind": {"single_classification", "pair_classification", "pair_regression"},
    "task_defs.*.source": {"cs224n", "hub"},
}


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each dataclass field (parsed from the source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse_value(path: str, text: str, typ):
    """Turn a command-line string into the field's type, or raise naming the field."""
    try:
        if typ is bool:
            low = str(text).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        if typing.get_origin(typ) is list:
            items = text if isinstance(text, list) else [t for t in str(text).split(",") if t.strip()]
            return [str(t).strip() for t in items]
        return str(text)
    except ValueError:
        raise ConfigError(f"{path}: expected {getattr(typ, '__name__', typ)}, got {text!r}") from None


def _types(obj) -> dict:
    return typing.get_type_hints(type(obj))


def set_value(cfg: Config, dotted: str, text) -> None:
    """Set ``cfg.<dotted>`` from a string, creating ``heads.<task>`` / ``task_defs.<name>`` entries."""
    parts, obj, walked = dotted.split("."), cfg, []
    for i, name in enumerate(parts):
        walked.append(name)
        path = ".".join(walked)
        if isinstance(obj, dict):
            kind = HeadCfg if walked[0] == "heads" else TaskDefCfg
            obj = obj.setdefault(name, kind())
            continue
        hints = _types(obj)
        if name not in hints:
            close = difflib.get_close_matches(name, list(hints), n=1)
            hint = f" (did you mean {'.'.join(walked[:-1] + close)}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}; see --help")
        if i == len(parts) - 1:
            if typing.get_origin(hints[name]) is dict:
                raise ConfigError(f"{path}: give a field, e.g. {path}.<task>.kind")
            setattr(obj, name, _parse_value(path, text, hints[name]))
            return
        obj = getattr(obj, name)
    raise ConfigError(f"{dotted}: give a field, not a section")


def _flatten(d: dict, prefix="") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_file(cfg: Config, path: str) -> None:
    """Apply a YAML or JSON file of (nested) fields, e.g. the config.json of an earlier run."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file {path}")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # the parser's message has the line number
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    for key, value in _flatten(data).items():
        set_value(cfg, key, value if isinstance(value, (list, str)) else str(value))


def parse_args(argv: list[str]) -> Config:
    """Defaults, then ``--preset NAME[,NAME]``, ``--config FILE``, then ``--a.b=value`` overrides."""
    if "-h" in argv or "--help" in argv:
        print(help_text())
        sys.exit(0)
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --train.lr=3e-5")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg[2:], argv[i + 1]
            i += 1
        else:
            key, value = arg[2:], "true"  # a bare flag: --train.compile
        pairs.append((key, value))
        i += 1
    cfg = Config()
    for key, value in pairs:
        if key == "preset":
            for name in value.split(","):
                if name not in PRESETS:
                    raise ConfigError(f"--preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
                for k, v in (o[2:].split("=", 1) for o in PRESETS[name]):
                    set_value(cfg, k, v)
    for key, value in pairs:
        if key == "config":
            load_file(cfg, value)
    for key, value in pairs:
        if key not in ("preset", "config"):
            set_value(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject impossible values and combinations before any work; messages name the field."""
    for key, value in _flatten(to_dict(cfg)).items():
        _check_choice(key, value)
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every < / > check
            raise ConfigError(f"{key}: must be a finite number, got {value}")
    _check_numbers(cfg)
    _check_tasks(cfg)
    _check_method(cfg)


def _check_choice(path: str, value) -> None:
    pattern = path if path in CHOICES else ".".join(p if j != 1 else "*" for j, p in enumerate(path.split(".")))
    allowed = CHOICES.get(pattern)
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{path}: {value!r} is not one of {sorted(allowed)}")


def _check_numbers(cfg: Config) -> None:
    t, d, m = cfg.train, cfg.data, cfg.method
    positive = {"data.batch_size": d.batch_size, "data.eval_batch_size": d.eval_batch_size,
                "train.epochs": t.epochs, "train.grad_accum": t.grad_accum, "train.log_every": t.log_every,
                "model.max_length": cfg.model.max_length, "train.keep_last": t.keep_last,
                "train.max_bad_steps": t.max_bad_steps}
    for path, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{path}: must be > 0, got {v}")
    for path, v in {"train.lr": t.lr, "train.head_lr": t.head_lr, "train.weight_decay": t.weight_decay,
                    "train.grad_clip": t.grad_clip, "train.max_steps": t.max_steps,
                    "train.eval_every": t.eval_every, "data.max_train": d.max_train,
                    "method.arrp_batches": m.arrp_batches, "method.smart_steps": m.smart_steps}.items():
        if v < 0:
            raise ConfigError(f"{path}: must be >= 0, got {v}")
    if t.lr == 0:
        raise ConfigError("train.lr: must be > 0")
    if not 0 < t.layer_lr_decay <= 1:
        raise ConfigError(f"train.layer_lr_decay: must be in (0, 1], got {t.layer_lr_decay}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: must be in [0, 1) (0 = no weight average), got {t.ema_decay}")
    for path, v in {"train.temperature": t.temperature, "method.smart_step": m.smart_step,
                    "method.smart_noise": m.smart_noise}.items():
        if v <= 0:
            raise ConfigError(f"{path}: must be > 0, got {v}")
    for path, v in {"data.max_eval": d.max_eval, "method.smart_weight": m.smart_weight,
                    "method.arrp_weight": m.arrp_weight}.items():
        if v < 0:
            raise ConfigError(f"{path}: must be >= 0, got {v}")
    if not (cfg.model.dropout == -1 or 0 <= cfg.model.dropout < 1):
        raise ConfigError(f"model.dropout: -1 (the checkpoint's) or in [0, 1), got {cfg.model.dropout}")
    if cfg.model.init_weights and not Path(cfg.model.init_weights).is_file():
        raise ConfigError(f"model.init_weights: no such file {cfg.model.init_weights}")
    if not 0 <= t.warmup < 1:
        raise ConfigError(f"train.warmup: a fraction in [0, 1), got {t.warmup}")
    factor, _, base = t.epoch_steps.rpartition("*")
    try:
        if base in ("smallest", "largest", "sum"):
            assert float(factor or 1) > 0
        else:
            assert int(t.epoch_steps) > 0
    except (ValueError, AssertionError):
        raise ConfigError(f"train.epoch_steps: `smallest`, `largest`, `sum`, a multiple like `2*largest`, "
                          f"or a positive integer, got {t.epoch_steps!r}") from None


def _check_tasks(cfg: Config) -> None:
    d, t = cfg.data, cfg.train
    if not d.tasks:
        raise ConfigError("data.tasks: name at least one task")
    if len(set(d.tasks)) != len(d.tasks):
        raise ConfigError(f"data.tasks: a task is listed twice: {d.tasks}")
    from mtbert.data.tasks import TASKS  # local import: tasks.py imports this module
    for name in d.tasks:
        if name not in TASKS and name not in cfg.task_defs:
            raise ConfigError(f"data.tasks: unknown task {name!r}; built in: {', '.join(TASKS)}; "
                              f"or define it with --task_defs.{name}.kind=... ")
    for name, head in cfg.heads.items():
        if name not in d.tasks:
            raise ConfigError(f"heads.{name}: {name!r} is not in data.tasks {d.tasks}")
        if head.weight < 0 or head.layers not in (1, 2) or not 0 <= head.dropout < 1:
            raise ConfigError(f"heads.{name}: weight must be >= 0, layers 1 or 2, dropout in [0, 1); "
                              f"got weight={head.weight}, layers={head.layers}, dropout={head.dropout}")
    for name in t.train_tasks:
        if name not in d.tasks:
            raise ConfigError(f"train.train_tasks: {name!r} is not in data.tasks {d.tasks}")


def _check_method(cfg: Config) -> None:
    t, m = cfg.train, cfg.method
    trained = t.train_tasks or cfg.data.tasks
    multi = {"method.name": m.name not in ("sum", "mean"), "method.pairwise": m.pairwise,
             "method.arrp_batches": m.arrp_batches > 0}
    for path, on in multi.items():
        if on and len(trained) < 2:
            raise ConfigError(f"{path}: needs at least two trained tasks, got {trained}")
    if m.arrp_batches and t.schedule != "round_robin":
        raise ConfigError("method.arrp_batches: ARRP extends round-robin training; set train.schedule=round_robin")
    if m.pairwise and t.schedule != "round_robin":
        raise ConfigError("method.pairwise: pairs are trained round-robin; set train.schedule=round_robin")
    _check_method_family(cfg)
    if cfg.model.sharing:
        from mtbert.model.heads import parse_sharing
        try:
            parse_sharing(cfg.model.sharing)
        except ValueError as e:
            raise ConfigError(f"model.sharing: {e}") from None


def _check_method_family(cfg: Config) -> None:
    """Hyper-parameters of the gradient and loss-weighting methods, and their unproved combinations."""
    m = cfg.method
    if m.gram_blocks != "whole" and not per_task(m.name):
        raise ConfigError(f"method.gram_blocks={m.gram_blocks}: block Grams are for per-task methods "
                          f"({', '.join(GRADIENT_METHODS)}), not method.name={m.name}")
    if m.gram_blocks != "whole" and per_task(m.name):
        from mtbert.optim.aggregators import AGGREGATORS
        if not AGGREGATORS[m.name].blocks:
            raise ConfigError(f"method.gram_blocks: {m.name} solves one problem per step over all shared parameters "
                              f"(state or coordinates, not per block); use whole")
    if m.name == "cr_mogm":
        from mtbert.optim.aggregators import AGGREGATORS
        inner = [n for n, a in AGGREGATORS.items() if a.fn and not a.init_state and n not in ("gse", "cr_mogm")]
        if m.cr_mogm_inner not in inner:
            raise ConfigError(f"method.cr_mogm_inner: {m.cr_mogm_inner!r} is not a stateless per-task method; "
                              f"use one of {', '.join(inner)}")
    for path, v, ok in (("method.cagrad_c", m.cagrad_c, m.cagrad_c >= 0),
                        ("method.gradvac_beta", m.gradvac_beta, 0 < m.gradvac_beta <= 1),
                        ("method.dwa_temperature", m.dwa_temperature, m.dwa_temperature > 0),
                        ("method.dwa_window", m.dwa_window, m.dwa_window > 0),
                        ("method.famo_lr", m.famo_lr, m.famo_lr > 0), ("method.famo_decay", m.famo_decay, m.famo_decay >= 0),
                        ("method.fairgrad_alpha", m.fairgrad_alpha, m.fairgrad_alpha >= 0),
                        ("method.pcd_tau", m.pcd_tau, 0 <= m.pcd_tau <= 1),
                        ("method.sdmgrad_lambda", m.sdmgrad_lambda, m.sdmgrad_lambda >= 0),
                        ("method.modo_gamma", m.modo_gamma, m.modo_gamma > 0), ("method.modo_rho", m.modo_rho, m.modo_rho >= 0),
                        ("method.cr_mogm_alpha", m.cr_mogm_alpha, 0 <= m.cr_mogm_alpha <= 1),
                        ("method.gradnorm_alpha", m.gradnorm_alpha, m.gradnorm_alpha >= 0),
                        ("method.gradnorm_lr", m.gradnorm_lr, m.gradnorm_lr > 0),
                        ("method.krum_byzantine", m.krum_byzantine, m.krum_byzantine >= 0),
                        ("method.krum_selected", m.krum_selected, m.krum_selected >= 1),
                        ("method.trim", m.trim, m.trim >= 0),
                        ("method.excess_eta", m.excess_eta, m.excess_eta > 0),
                        ("method.moco_gamma", m.moco_gamma, m.moco_gamma > 0), ("method.moco_rho", m.moco_rho, m.moco_rho >= 0),
                        ("method.dbmtl_beta", m.dbmtl_beta, 0 <= m.dbmtl_beta < 1),
                        ("method.stch_mu", m.stch_mu, m.stch_mu > 0), ("method.stch_warmup", m.stch_warmup,
                                                                         m.stch_warmup >= 0),
                        ("method.uw_lr", m.uw_lr, m.uw_lr > 0)):
        if not ok:
            raise ConfigError(f"{path}: out of range, got {v} (see --help)")
    if m.name == "famo" and m.smart:
        raise ConfigError("method.smart: FAMO's loss-change update re-evaluates the plain task losses; "
                          "SMART's noise terms are not part of them (not supported together)")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def help_text() -> str:
    lines = ["usage: accelerate launch mtbert/train.py [--preset NAME] [--config FILE] [--section.field=VALUE ...]",
             "", f"presets: {', '.join(PRESETS)}", f"data: --data.dir or ${DATA_DIR_ENV}", "",
             "methods (--preset NAME; mtbert/methods/registry.py):"]
    from mtbert.methods.registry import METHODS
    for name, spec in METHODS.items():
        lines.append(textwrap.fill(f"{name}: {spec.title} — {spec.source}" + (f"; refuses {spec.refuses}" if spec.refuses
                                   else ""), 96, initial_indent="  ", subsequent_indent="      "))
    lines.append("")
    sections = [("model", ModelCfg), ("data", DataCfg), ("train", TrainCfg), ("method", MethodCfg),
                ("log", LogCfg), ("heads.<task>", HeadCfg), ("task_defs.<name>", TaskDefCfg)]
    for prefix, cls in sections:
        lines.append(f"[{prefix}]")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{prefix}.{f.name}={default!r}")
            lines.append(textwrap.fill(docs.get(f.name, ""), 96, initial_indent="      ", subsequent_indent="      "))
        lines.append("")
    return "\n".join(lines)


"""The typed run configuration: one dataclass per section, a docstring under every field (the
``--help`` text is read from them), and the method lists the dataclasses' values are checked
against. Plain data: no parsing (mtbert/config/cli.py) and no checks (mtbert/config/validate.py),
so the model, data and optimizer code below can import it without importing the registries.

Precedence of the values (cli.py): defaults < preset < --config file < command-line overrides.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field

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
    a multitask model per task (mtbert.training.ensemble)."""


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


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each dataclass field (parsed from the source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def flatten(d: dict, prefix="") -> dict[str, object]:
    """Nested dicts -> ``{"train.lr": 3e-5, ...}`` (dotted field paths)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)

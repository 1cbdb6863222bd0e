"""Tokenize a task split once, then build dynamically padded batches from example indices."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mtbert.data.cs224n import read_cs224n
from mtbert.data.hub import read_hub

SAMPLE_DIR = Path(__file__).parent / "sample"


@dataclass
class TokenizedSplit:
    """One task split: token ids per example (lists, padded per batch), labels, ids."""

    task: str
    ids: list[str]
    a: list[list[int]]
    b: list[list[int]] | None  # second sentence (bi-encoder pairs)
    types: list[list[int]] | None  # segment ids (cross-encoder pairs)
    labels: torch.Tensor | None  # [N] float; None for test files
    report: str = ""

    def __len__(self):
        return len(self.ids)

    def lengths(self) -> list[int]:
        return [max(len(x), len(y)) for x, y in zip(self.a, self.b)] if self.b else [len(x) for x in self.a]

    def token_count(self, idx) -> int:
        """Non-padding tokens in examples ``idx`` (host-side: no device sync)."""
        return sum(len(self.a[i]) + (len(self.b[i]) if self.b else 0) for i in idx)

    def batch(self, idx, device=None) -> dict:
        """Padded tensors for examples ``idx``: a_ids/a_mask[/a_types][/b_ids/b_mask] [B, T], labels [B]."""
        out = {}
        for key, seqs in (("a", self.a), ("b", self.b)):
            if seqs is None:
                continue
            rows = [seqs[i] for i in idx]
            T = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), T, dtype=torch.long)
            mask = torch.zeros(len(rows), T, dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
            out[f"{key}_ids"], out[f"{key}_mask"] = ids, mask
            if key == "a" and self.types is not None:
                types = torch.zeros(len(rows), T, dtype=torch.long)
                for j, i in enumerate(idx):
                    types[j, :len(self.types[i])] = torch.tensor(self.types[i])
                out["a_types"] = types
        out["index"] = torch.tensor(list(idx), dtype=torch.long)  # [B] example indices (SMART's noise seeds)
        if self.labels is not None:
            out["labels"] = self.labels[list(idx)]
        if device is not None and torch.device(device).type == "cuda":
            out = {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}  # async copy
        elif device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out


def sample_name(name: str) -> str:
    """The packaged sample's file for a course file name (ids-sst-train.csv -> sample_ids_sst_train.csv)."""
    return "sample_" + name.replace("-", "_")


def data_dir(cfg) -> Path:
    import os
    d = cfg.data.dir or os.environ.get("MTBERT_DATA_DIR", "")
    return Path(d) if d else SAMPLE_DIR


def task_file(spec, split: str, cfg) -> Path:
    """Where a CS224N-format task split lives: absolute, or under data.dir (or the sample)."""
    path, folder = Path(spec.files[split]), data_dir(cfg)
    if path.is_absolute():
        return path
    return folder / (sample_name(path.name) if folder == SAMPLE_DIR else path)


# Several runs in one process (mtbert.training.multirun: the tests' launch groups, sweeps of short runs)
# read and tokenize the same files: the result is kept per (file as it is on disk, settings,
# tokenizer). A run gets its own outer lists and labels; the token id lists are never modified.
_TOKENIZED: dict[tuple, TokenizedSplit] = {}


def _cache_key(spec, split: str, cfg, tokenizer, head_kind: str, path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_mtime_ns, st.st_size, spec.name, spec.kind, spec.num_labels,
            tuple(spec.label_range), tuple(sorted(spec.columns.items())), split, cfg.data.skip_bad_rows,
            cfg.data.max_train if split == "train" else cfg.data.max_eval if split == "dev" else 0,
            cfg.model.max_length, spec.pair and head_kind == "cross", getattr(tokenizer, "name_or_path", None),
            len(tokenizer))


def load_split(spec, split: str, cfg, tokenizer, head_kind: str, log=print) -> TokenizedSplit | None:
    """Read and tokenize one split ('train', 'dev', 'test'); None if the task has no such file."""
    key = None
    if spec.source != "hub" and split in spec.files:
        path = task_file(spec, split, cfg)
        key = _cache_key(spec, split, cfg, tokenizer, head_kind, path)
    if key is not None and key in _TOKENIZED:
        log(_TOKENIZED[key].report)
        return _run_copy(_TOKENIZED[key])
    out = _load_split(spec, split, cfg, tokenizer, head_kind, log)
    if key is not None and out is not None:
        _TOKENIZED[key] = out
        return _run_copy(out)  # the run gets a copy, not the kept one
    return out


def _run_copy(kept: TokenizedSplit) -> TokenizedSplit:
    """A run's own outer lists and labels over the kept (never modified) token id lists."""
    return TokenizedSplit(kept.task, list(kept.ids), list(kept.a), None if kept.b is None else list(kept.b),
                          None if kept.types is None else list(kept.types),
                          None if kept.labels is None else kept.labels.clone(), kept.report)


def _load_split(spec, split: str, cfg, tokenizer, head_kind: str, log=print) -> TokenizedSplit | None:
    """Read and tokenize one split ('train', 'dev', 'test'); None if the task has no such file."""
    labeled = split != "test"
    if spec.source == "hub":
        if split not in spec.files:
            return None
        examples, report = read_hub(spec, spec.files[split], labeled, cfg.data.skip_bad_rows)
    else:
        if split not in spec.files:
            return None
        path = task_file(spec, split, cfg)
        if split == "test" and not path.exists():
            return None  # test files are optional (e.g. no Quora test file offline)
        examples, report = read_cs224n(path, spec, labeled, cfg.data.skip_bad_rows)
    limit = cfg.data.max_train if split == "train" else cfg.data.max_eval if split == "dev" else 0
    if limit:
        examples = examples[:limit]
    line = report.summary() + (f" (using {len(examples)})" if limit else "")
    log(line)
    L = cfg.model.max_length
    a_text = [e.text_a for e in examples]
    types = b = None
    if spec.pair and head_kind == "cross":
        enc = tokenizer(a_text, [e.text_b for e in examples], truncation="longest_first", max_length=L,
                        return_token_type_ids=True)
        a, types = enc["input_ids"], enc["token_type_ids"]
    else:
        a = tokenizer(a_text, truncation=True, max_length=L)["input_ids"]
        if spec.pair:
            b = tokenizer([e.text_b for e in examples], truncation=True, max_length=L)["input_ids"]
    labels = torch.tensor([e.label for e in examples], dtype=torch.float32) if labeled else None
    return TokenizedSplit(spec.name, [e.id for e in examples], a, b, types, labels, line)

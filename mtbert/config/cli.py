"""The command line and config files -> a checked Config; the ``--help`` text.

    python mtbert/train.py --preset recipe --train.lr=3e-5 --data.tasks=sst,sts
    python mtbert/train.py --config my_run.yaml --heads.sts.kind=cosine

Precedence: defaults < preset < --config file < command-line overrides. Every value is
checked before any work starts (validate.py); an error names the field (``train.lr``) and what
is wrong.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import textwrap
import typing
from pathlib import Path

from mtbert.config.presets import PRESETS
from mtbert.config.schema import (
    DATA_DIR_ENV,
    Config,
    DataCfg,
    HeadCfg,
    LogCfg,
    MethodCfg,
    ModelCfg,
    TaskDefCfg,
    TrainCfg,
    field_docs,
    flatten,
)
from mtbert.config.validate import validate
from mtbert.errors import ConfigError


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
    for key, value in flatten(data).items():
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


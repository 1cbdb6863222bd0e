"""One registry entry per method: presets, compare labels, --help, compare_methods and the
README's methods table all come from it."""

import sys
from pathlib import Path

import pytest

from mtbert.config.cli import help_text, parse_args
from mtbert.config.presets import PRESETS
from mtbert.config.schema import to_dict
from mtbert.methods.registry import METHODS, label, markdown_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", [n for n, s in METHODS.items() if s.preset])
def test_each_methods_preset_is_labelled_with_its_title(name):
    got = label(to_dict(parse_args([f"--preset={name}"])))
    assert got == METHODS[name].title or (name == "arrp" and got == f"{METHODS['pcgrad'].title} + ARRP")


def test_combinations_are_labelled_by_their_parts():
    cfg = to_dict(parse_args(["--method.name=pcgrad", "--method.smart=true"]))
    assert label(cfg) == f"{METHODS['pcgrad'].title} + {METHODS['smart'].title}"
    cfg = to_dict(parse_args(["--method.name=pcgrad", "--train.schedule=temperature"]))
    assert label(cfg) == f"{METHODS['pcgrad'].title} + temperature"  # a schedule no entry sets is named


def test_help_and_presets_list_every_method():
    text = help_text()
    for name, spec in METHODS.items():
        assert f"{name}: {spec.title}" in text
        assert (name in PRESETS) == spec.preset


def test_compare_methods_runs_every_comparable_method():
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import compare_methods
    finally:
        sys.path.pop(0)
    assert set(compare_methods.methods(60)) == {s.title for s in METHODS.values() if s.compare}


def test_the_readme_methods_table_is_the_registrys():
    assert markdown_table() in (ROOT / "README.md").read_text(), \
        "README's methods table is out of date: paste `python -m mtbert.methods.registry`"


def test_the_method_names_config_accepts_are_the_registries():
    from mtbert.config.schema import GRADIENT_METHODS, LOSS_METHODS
    from mtbert.optim.aggregators import AGGREGATORS
    from mtbert.optim.loss_weighting import LOSS_WEIGHTINGS
    assert set(LOSS_METHODS) == set(LOSS_WEIGHTINGS)
    assert set(GRADIENT_METHODS) == set(AGGREGATORS) - {"sum", "mean"}
    in_registry = {o.split("=", 1)[1] for s in METHODS.values() for o in s.overrides if o.startswith("--method.name=")}
    assert set(GRADIENT_METHODS) | set(LOSS_METHODS) <= in_registry | {"sum"}, "a method without a registry entry"

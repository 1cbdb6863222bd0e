"""The package's shape: the README's layout section names every module; no module imports in a
circle; every import points down the layers (a module knows its own layer and those below)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Low to high. A module may import modules of its own layer (no circle among them) and of lower ones.
LAYERS = [
    ("mtbert.errors", "mtbert.config.schema"),  # plain data: the typed config, the user-facing errors
    ("mtbert.model", "mtbert.data", "mtbert.methods", "mtbert.optim",  # the model, data and the mathematics
     "mtbert.distributed.collectives"),  # the one gate to torch.distributed (the reducers use it)
    ("mtbert.config",),  # parsing, presets, validation: they know every registry
    ("mtbert.distributed",),  # accelerator set-up and refusals, engines, replica checks
    ("mtbert.report",),  # the run's log; comparisons of finished runs (never the trainer's objects)
    ("mtbert.training", "mtbert.train"),  # the loop and what it is made of; train.py is its entry point
    ("mtbert.bench", "mtbert.compare"),  # entry points over everything
]


def module_name(path: Path, top: Path) -> str:
    parts = path.relative_to(top).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT / "mtbert") -> dict[str, set[str]]:
    """module -> the mtbert modules it imports (at the top or inside a function: both run)."""
    modules = {module_name(p, root.parent): p for p in root.rglob("*.py")}

    def resolve(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names if a.name.startswith("mtbert")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mtbert"):
                # `from mtbert.x import y` imports the submodule mtbert.x.y when there is one
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else resolve(node.module)
                         for a in node.names}
        graph[name] = deps - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names the module (mtbert.config.schema before mtbert.config)."""
    best = (-1, -1)
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                best = max(best, (len(prefix), i))
    return best[1]


def test_readme_layout_names_every_module():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    missing = []
    for path in sorted((ROOT / "mtbert").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if path.name == "__init__.py" or "sample" in rel.parts:
            continue
        if str(rel) not in layout and not (path.name in layout and f"{rel.parent}/" in layout):
            missing.append(str(rel))
    assert not missing, f"README layout does not mention: {missing}"


def test_no_module_imports_in_a_circle():
    found = circles(import_graph())
    assert not found, "import circles (break each, e.g. by moving what both need below them): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_every_import_points_down_the_layers():
    graph = import_graph()
    unplaced = sorted(m for m in graph if m != "mtbert" and layer_of(m) < 0)
    assert not unplaced, f"modules in no layer of tests/test_layout.py's LAYERS: {unplaced}"
    upward = sorted(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
                    for m, deps in graph.items() if m != "mtbert" for d in deps
                    if d != "mtbert" and layer_of(d) > layer_of(m))
    assert not upward, "imports that point up the layers:\n  " + "\n  ".join(upward)


def test_the_checks_find_what_they_look_for(tmp_path):
    """On a made-up package: a circle through a function-level import, and an upward import, are found."""
    pkg = tmp_path / "mtbert"
    (pkg / "model").mkdir(parents=True)
    for name, text in {"__init__.py": "", "model/__init__.py": "", "model/a.py": "from mtbert.model import b\n",
                       "model/b.py": "def f():\n    from mtbert.model.a import x\n    import mtbert.train\n",
                       "train.py": "from mtbert.model.b import f\n"}.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["mtbert.model.a"] == {"mtbert.model.b"}
    assert graph["mtbert.model.b"] == {"mtbert.model.a", "mtbert.train"}
    assert sorted(map(tuple, circles(graph))) == [("mtbert.model.a", "mtbert.model.b", "mtbert.train")]
    assert layer_of("mtbert.model.b") < layer_of("mtbert.train")  # b -> train points up
    assert layer_of("mtbert.config.schema") < layer_of("mtbert.model") < layer_of("mtbert.config.cli")


def test_every_module_is_in_the_installed_package():
    """setuptools finds the packages by their __init__.py (pyproject.toml: packages.find): a folder of
    modules without one is left out of the wheel, and an installed mtbert cannot import it."""
    from setuptools import find_packages
    found = set(find_packages(str(ROOT), include=["mtbert*"]))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mtbert").rglob("*.py")
               if "sample" not in p.parts}  # data/sample: package data and its generator script
    assert folders <= found, f"folders of modules that a wheel would leave out: {sorted(folders - found)}"

"""The README's layout section names every module of the package."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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

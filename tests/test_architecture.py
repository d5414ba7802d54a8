"""The package's shape: every module sits in a layer, and imports only run downward.

    apps -> dicom -> inference | training -> evaluation -> explain -> core (+ grad_cam.py)

``inference`` and ``training`` are peers and never import each other; ``devtools`` (test and benchmark
helpers) may import anything and nothing imports it; no module imports an entry-point script. Imports inside
functions count too: a "lazy" upward import is still a cycle in the design.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mediscan"
#: Rank of each layer; a module may import its own layer's modules and those of strictly lower rank.
LAYERS = {"core": 0, "explain": 1, "evaluation": 2, "training": 3, "inference": 3, "dicom": 4, "apps": 5,
          "devtools": 6}
ENTRY_POINTS = {"app", "test_single_image", "densenet121_xray_classifier"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from x import y`` counts as ``x.y`` when that is a
    module of the project, else as ``x``)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if project_module_exists(candidate) else base)
    return found


def project_module_exists(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "mediscan" else None


def project_modules() -> dict[str, Path]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules.update({p.stem: p for p in ROOT.glob("*.py")})
    return modules


def violations(modules: dict[str, Path]) -> list[str]:
    problems = []
    for name, path in sorted(modules.items()):
        targets = {t for t in imported_modules(path)
                   if t.split(".")[0] in ("mediscan", "grad_cam") or t in ENTRY_POINTS}
        for target in sorted(targets):
            problems += edge_problems(name, target)
        flat = name.count(".") == 1 and path.name != "__init__.py"       # mediscan/x.py, beside the layers
        if name.startswith("mediscan.") and (flat or layer_of(name) not in LAYERS):
            problems.append(f"{name}: in no layer (move it under one of mediscan/{{{', '.join(LAYERS)}}}/)")
    return problems


def edge_problems(source: str, target: str) -> list[str]:
    if target in ENTRY_POINTS:
        return [f"{source} imports the entry point {target}: entry points are thin shims over mediscan.apps"]
    if source == "grad_cam":
        return [f"grad_cam imports {target}: the CAM maths imports nothing of the project"]
    if source == "mediscan" and target.startswith("mediscan."):
        return [f"mediscan/__init__.py imports {target}: the package root must stay import-free"]
    src, dst = layer_of(source), layer_of(target)
    if dst is None or src is None or src == dst:       # grad_cam / mediscan root, or within one layer
        return []
    if dst == "devtools":
        return [f"{source} imports {target}: only tests and benchmarks use mediscan.devtools"]
    if src not in LAYERS or dst not in LAYERS:
        return [f"{source} imports {target}: {src if src not in LAYERS else dst} is in no layer"]
    if LAYERS[dst] >= LAYERS[src]:
        return [f"{source} imports {target}: {src} may only import layers below it, not {dst}"]
    return []


def cycles(modules: dict[str, Path]) -> list[list[str]]:
    graph = {n: {t for t in imported_modules(p) if t in modules and t != n} for n, p in modules.items()}
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_every_module_sits_in_a_layer_and_imports_only_downward():
    problems = violations(project_modules())
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    found = cycles(project_modules())
    assert not found, "\n".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("source, target, bad", [
    ("mediscan.core.imaging", "mediscan.inference.predictor", True),       # upward
    ("mediscan.evaluation.report", "mediscan.training.fit", True),         # the old circle's upward half
    ("mediscan.inference.predictor", "mediscan.training.fit", True),       # peers
    ("mediscan.apps.api", "test_single_image", True),                      # an entry point
    ("mediscan.core.model", "mediscan.devtools.synthetic", True),
    ("grad_cam", "mediscan.core.model", True),
    ("mediscan.training.fit", "mediscan.evaluation.metrics", False),
    ("mediscan.apps.api", "mediscan.inference.predictor", False),
    ("mediscan.core.checkpoint", "mediscan.core.model", False),
])
def test_the_rule_itself(source, target, bad):
    assert bool(edge_problems(source, target)) is bad


def test_flat_modules_are_caught(tmp_path, monkeypatch):
    """Today's rule would have failed on the old flat layout (mediscan/training.py beside evaluation.py)."""
    fake = tmp_path / "mediscan"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "training.py").write_text("from .evaluation import x\n")
    (fake / "evaluation.py").write_text("def f():\n    from .training import y\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    modules = {module_name(p): p for p in fake.rglob("*.py")}
    assert any("in no layer" in p for p in violations(modules))
    assert cycles(modules)

"""The mutation run's set-up (bench/mutation.py): the tests it names exist, and its preload plugin does what
the run's time depends on. The run itself takes ~20 minutes and is not part of the suite (docs/mutation.md).
"""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutation_module():
    spec = importlib.util.spec_from_file_location("bench_mutation", ROOT / "bench" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module         # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _test_functions(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_a_target_names_exists():
    """A renamed or deleted test would make mutmut stop with "no tests ran" halfway through a 20-minute run."""
    mutation = _mutation_module()
    for name, target in mutation.TARGETS.items():
        assert (ROOT / target.path).is_file(), f"{name}: {target.path} does not exist"
        for test in (*target.tests, *target.deselect):
            file, _, function = test.partition("::")
            assert (ROOT / file).is_file(), f"{name}: {file} does not exist"
            if function:
                function = function.split("[", 1)[0]      # a parametrised id names its function first
                assert function in _test_functions(ROOT / file), f"{name}: {test} is not a test in {file}"


def test_the_targets_functions_exist_in_their_files():
    mutation = _mutation_module()
    for name, target in mutation.TARGETS.items():
        tree = ast.parse((ROOT / target.path).read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        defined |= {f"{cls.name}.{node.name}" for cls in tree.body if isinstance(cls, ast.ClassDef)
                    for node in cls.body if isinstance(node, ast.FunctionDef)}
        missing = set(target.functions or ()) - defined
        assert not missing, f"{name}: {sorted(missing)} not defined in {target.path}"


def test_the_preload_plugin_imports_torchxrayvision_and_freezes_it():
    """Without the import every mutant pays ~7 s for it; without the freeze, ~1.8 s of garbage collection."""
    probe = ("import gc, sys; import mediscan.devtools.mutation_preload; "
             "print('torchxrayvision' in sys.modules, gc.get_freeze_count())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    imported, frozen = out.stdout.split()
    assert imported == "True"
    assert int(frozen) > 100_000, f"only {frozen} objects frozen"

"""Mutation testing of the tests that guard MediScan's numbers: do they fail when the code is wrong?

    python bench/mutation.py                      # every target below (measured times: docs/mutation.md)
    python bench/mutation.py --only metrics,resume --max-children 2
    python bench/mutation.py --survivors docs/survivors.txt    # also write each survivor's diff there

mutmut (a dev requirement) makes small changes ("mutants") to the code -- ``<`` for ``<=``, ``+ 1`` on a
number, a dropped argument, a string wrapped in ``XX`` -- one at a time, and runs the tests that cover the
changed function (it records which tests call which function in a first clean run). A mutant the tests
catch is killed; one they miss survived, and is either a hole in the tests or an equivalent mutant (the
change makes no observable difference). The score printed per target is killed / all mutants.

The targets: the evaluation metrics, the checkpoint format, the DICOM decoding path, the Predictor's batched
path and training's resume. The run happens in a copy of the repository under ``--workdir`` (default
``build/mutation``, git-ignored) so the working tree is never modified; it takes no network and no GPU.
Survivors judged equivalent are listed, with the reason, in docs/mutation.md.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What mutmut may copy besides the package: the top-level modules the tests import, and pytest's settings.
ALSO_COPY = ("grad_cam.py", "app.py", "test_single_image.py", "densenet121_xray_classifier.py", "pytest.ini")


@dataclass(frozen=True)
class Target:
    """One file to mutate, the functions in it (``None``: all), the test files that guard them, and tests of
    those files left out of the mutation run (``deselect``: slow ones that guard other functions)."""

    path: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] | None = None
    deselect: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return self.path[:-3].replace("/", ".")

    def patterns(self) -> list[str]:
        """mutmut's names for this target's mutants: ``module.x_func__mutmut_N`` and
        ``module.xǁClassǁmethod__mutmut_N``."""
        if self.functions is None:
            return [f"{self.module}.*"]
        names = []
        for function in self.functions:
            cls, _, method = function.rpartition(".")
            names.append(f"{self.module}.xǁ{cls}ǁ{method}__mutmut_*" if cls else f"{self.module}.x_{function}__mutmut_*")
        return names


#: DICOM decoding tests of test_imaging.py (its other tests never reach dicom_pixels' grayscale path).
_IMAGING_DICOM = tuple(f"tests/test_imaging.py::test_dicom_{name}" for name in (
    "monochrome2_16bit_with_rescale", "window_is_applied_after_rescale", "monochrome1_is_inverted",
    "signed_and_constant", "multiframe_uses_first_frame_with_warning",
    "enhanced_multiframe_uses_frame_one_functional_groups", "rgb_becomes_grayscale",
    "palette_colour_is_measured_on_the_lookup_table_scale", "grayscale_has_no_colour_and_large_or_ybr_colour_decodes",
    "16bit_rgb_colourfulness_is_measured_on_its_bits_stored_scale"))
#: The unit tests of test_resume.py; its two end-to-end resumes (3 tiny trainings, ~1 min idle, ~4 min on a
#: loaded 2-core box) are left out of the mutation run for time -- they would only add kills.
_RESUME_UNIT = tuple(f"tests/test_resume.py::{name}" for name in (
    "test_optimizer_state_round_trip_continues_like_the_original",
    "test_resume_restores_weights_and_the_optimizer_of_the_stage_it_continues",
    "test_resume_refuses_a_checkpoint_of_other_classes_or_other_files",
    "test_a_fresh_stage_2_optimizer_is_capturable_only_when_asked"))

TARGETS = {
    "metrics": Target("mediscan/evaluation/metrics.py", ("tests/test_metrics.py",)),
    # The SIGKILL-mid-save test guards the atomic write (core/atomic_file.py), not these functions, and starts a
    # fresh Python with torch for every mutant (~15 s): left out.
    "checkpoint": Target("mediscan/core/checkpoint.py", ("tests/test_checkpoint.py",),
                         ("checkpoint_tensors", "read_metadata", "load_checkpoint", "_check_file"),
                         ("tests/test_checkpoint.py::test_killed_process_mid_save_leaves_previous_checkpoint_valid",)),
    # The pixel path (LUTs, window, MONOCHROME1, functional groups, frame choice); the error messages of
    # decode_dicom / _check_decodable are tested in test_imaging.py and test_dicom_decoding.py.
    "dicom": Target("mediscan/core/dicom_pixels.py", ("tests/test_dicom_pixels.py", *_IMAGING_DICOM),
                    ("_to_gray", "_lift_frame_functional_groups", "_first_frame")),
    "predictor-batch": Target(
        "mediscan/inference/predictor.py",
        ("tests/test_predictor_batch.py",
         "tests/test_predictor.py::test_batched_calls_default_to_eight_images_per_pass_on_the_cpu"),
        ("Predictor._forward", "Predictor._run_many", "Predictor.run_prepared")),
    "resume": Target("mediscan/training/resume.py", _RESUME_UNIT),
}

#: mutmut's exit codes for a mutant, as it reports them.
KILLED, SURVIVED, NO_TESTS, TIMEOUT = {1, 3}, {0}, {5, 33}, {-24, 24, 152, 255, 36}


def prepare(workdir: Path, targets: list[Target]) -> None:
    """A fresh copy of the package, tests and top-level modules, and mutmut's configuration (setup.cfg)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "mediscan", workdir / "mediscan", ignore=ignore)
    shutil.copytree(ROOT / "tests", workdir / "tests", ignore=ignore)
    for name in ALSO_COPY:
        shutil.copy2(ROOT / name, workdir / name)
    tests = sorted({test for target in targets for test in target.tests})
    deselected = sorted({test for target in targets for test in target.deselect})
    lines = ["[mutmut]", "source_paths = mediscan",
             "only_mutate =", *[f"    {t.path}" for t in targets],
             "also_copy =", *[f"    {name}" for name in ALSO_COPY],
             "pytest_add_cli_args_test_selection =", *[f"    {test}" for test in tests],
             # -p no:cacheprovider: no .pytest_cache; addopts= drops -ra (summaries nobody reads here);
             # mutation_preload: torchxrayvision imported once in the fork server, not once per mutant;
             # retention none: a mutant's tmp_path folders (checkpoints of ~100 MB) go when its tests end
             "pytest_add_cli_args =", "    -p", "    no:cacheprovider", "    -o", "    addopts=",
             "    -o", "    tmp_path_retention_policy=none",
             "    -p", "    mediscan.devtools.mutation_preload",
             *[line for test in deselected for line in ("    --deselect", f"    {test}")],
             # torch is not fork-safe once it has run: fork each mutant from a server that only imported
             "process_isolation = forkserver",
             "use_git_change_detection = false"]
    (workdir / "setup.cfg").write_text("\n".join(lines) + "\n")


def run_mutmut(workdir: Path, targets: list[Target], max_children: int, log_path: Path,
               only: list[str] | None = None) -> int:
    """mutmut run over the targets' mutants (or just ``only``), output to ``log_path``; its exit code."""
    patterns = only or [p for target in targets for p in target.patterns()]
    # The tests' temporary folders go under the work directory and are removed afterwards: mutmut's forked test
    # processes end without pytest's cleanup, and a full run leaves tens of GB of checkpoints behind.
    scratch = workdir / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    env.pop("CI", None)
    mutmut = shutil.which("mutmut") or "mutmut"
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run([mutmut, "run", "--max-children", str(max_children), *patterns], cwd=workdir,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return proc.returncode


def results(workdir: Path, target: Target) -> dict[str, int]:
    """Exit code of every mutant of ``target`` (from mutmut's per-file record)."""
    meta = json.loads((workdir / "mutants" / (target.path + ".meta")).read_text())
    codes = meta["exit_code_by_key"]
    patterns = target.patterns()
    return {name: code for name, code in codes.items()
            if code is not None and any(fnmatch.fnmatch(name, p) for p in patterns)}


def summarise(name: str, codes: dict[str, int]) -> tuple[int, int, list[str]]:
    killed = sum(code in KILLED or code in TIMEOUT for code in codes.values())
    survivors = sorted(n for n, code in codes.items() if not (code in KILLED or code in TIMEOUT))
    total = len(codes)
    score = 100.0 * killed / total if total else float("nan")
    kinds = {"survived": sum(c in SURVIVED for c in codes.values()), "no tests": sum(c in NO_TESTS for c in codes.values()),
             "timeout": sum(c in TIMEOUT for c in codes.values()),
             "other": sum(c not in KILLED | SURVIVED | NO_TESTS | TIMEOUT for c in codes.values())}
    detail = ", ".join(f"{k} {v}" for k, v in kinds.items() if v)
    print(f"{name:<16} {killed:>4} / {total:<4} killed  {score:5.1f} %" + (f"   ({detail})" if detail else ""))
    return killed, total, survivors


def write_survivors(workdir: Path, survivors: list[str], path: Path) -> None:
    """Each surviving mutant's diff (``mutmut show``), for judging whether it is equivalent."""
    mutmut = shutil.which("mutmut") or "mutmut"
    chunks = []
    for name in survivors:
        shown = subprocess.run([mutmut, "show", name], cwd=workdir, capture_output=True, text=True)
        chunks.append(shown.stdout.strip())
    path.write_text("\n\n".join(chunks) + "\n")
    print(f"survivor diffs: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated targets (default all: {', '.join(TARGETS)})")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "mutation",
                        help="where the copy and mutmut's mutants/ live (default build/mutation; wiped first)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2,
                        help="mutants tested at once (default: CPU count)")
    parser.add_argument("--survivors", type=Path, help="write the surviving mutants' diffs to this file")
    parser.add_argument("--mutants", help="comma-separated mutant names (or fnmatch patterns) to run instead of "
                                           "every mutant of the targets, e.g. a previous run's survivors")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    targets = [TARGETS[n] for n in names]
    if not shutil.which("mutmut"):
        print("mutmut is not installed: pip install -r requirements-dev.txt", file=sys.stderr)
        return 2

    started = time.perf_counter()
    workdir = args.workdir.resolve()
    prepare(workdir, targets)
    log_path = workdir / "mutmut.log"
    print(f"mutating {', '.join(names)} in {workdir} (log: {log_path}) ...", flush=True)
    code = run_mutmut(workdir, targets, args.max_children, log_path, args.mutants.split(",") if args.mutants else None)
    if code != 0:
        print(f"mutmut exited with {code}; the end of {log_path}:", file=sys.stderr)
        print("\n".join(log_path.read_text(errors="replace").splitlines()[-30:]), file=sys.stderr)
        return 1
    killed_all = total_all = 0
    survivors_all: list[str] = []
    print(f"\n{'target':<16} killed / mutants     score")
    for name, target in zip(names, targets):
        killed, total, survivors = summarise(name, results(workdir, target))
        killed_all, total_all = killed_all + killed, total_all + total
        survivors_all += survivors
    print(f"{'all':<16} {killed_all:>4} / {total_all:<4} killed  {100.0 * killed_all / max(total_all, 1):5.1f} %")
    print(f"\n{len(survivors_all)} survivors:" if survivors_all else "\nno survivors")
    for survivor in survivors_all:
        print(f"  {survivor}")
    if args.survivors:
        write_survivors(workdir, survivors_all, args.survivors)
    print(f"\n{time.perf_counter() - started:.0f} s, {args.max_children} workers")
    return 0


if __name__ == "__main__":
    sys.exit(main())

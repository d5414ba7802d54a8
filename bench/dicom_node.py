"""Throughput of the DICOM node end to end, against Predictor.predict on the same images in the same run.

    python bench/dicom_node.py                                  # 10 series x 10 instances, 512 x 512 CR
    python bench/dicom_node.py --series 4 --per-series 5 --input-size 64      # shrunk
    python bench/dicom_node.py --checkpoint models/best.safetensors
    python bench/dicom_node.py --series 1 --per-series 3 --sc-png docs/dicom_sc.png   # the README picture
    python bench/dicom_node.py --size 2048 --compress jpeg2000 --senders 2    # compressed radiographs, 2 senders

What it does, in one process (Orthanc is a subprocess with a temporary configuration and storage):

1. writes ``--series`` x ``--per-series`` 512 x 512 16-bit CR files (pydicom; one study), uncompressed or
   losslessly compressed (``--compress jpeg2000`` or ``jpegls``: what archives store radiographs as, and
   decoding them costs more than the network at 224 px does);
2. baseline: ``Predictor.predict(file bytes)`` on each of them, one after the other (decode + preprocess +
   forward + calibration, what each instance costs without any DICOM networking) -- measured before and
   again after the node's run, and averaged, so that a change in the machine's load during the run biases
   neither side;
3. starts Orthanc and a MediScan node (C-STORE back to Orthanc) and sends every file to the node with
   dcmtk's ``storescu`` -- ``--senders`` of them at once, each with its share of the series on its own
   association, as a PACS forwarding at full speed does; the clock runs from the first storescu's start to
   the moment Orthanc's study holds every result (one Secondary Capture + one SR per series).

Prints instances/s and series/s, the ratio to the baseline's instances/s (goal >= 0.8) and the results lost
(must be 0; exit status 1 otherwise). Without --checkpoint a random-init model at --input-size (default
224) is written to a temporary folder. Not a timed test: figures depend on the machine and its load;
compare the ratio within one run. Needs Debian's orthanc and dcmtk. ``--sc-png FILE`` also saves one of the
Secondary Captures Orthanc received, rendered from its DICOM pixel data (synthetic images only).

Threads: ``--threads`` torch intra-op threads (default 1: on a shared 2-core machine a 2-thread OpenMP team
spin-waits whenever the other core is busy); the baseline and the node use the same Predictor, so both run
with the same setting.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mediscan.apps.dicom_node import quiet_libraries
from mediscan.devtools.orthanc import dcmtk, orthanc_missing, orthanc_server, tools_missing
from mediscan.devtools.synthetic import dicom_study, write_tiny_checkpoint
from mediscan.dicom.node import DicomNode, NodeConfig
from mediscan.dicom.sender import CStoreDestination
from mediscan.inference.predictor import Predictor

#: --compress choices: their transfer syntaxes (lossless; pydicom encodes them with pylibjpeg / pyjpegls).
COMPRESSIONS = {"none": None, "jpeg2000": "1.2.840.10008.1.2.4.90", "jpegls": "1.2.840.10008.1.2.4.80"}
#: storescu's option to propose that transfer syntax (it offers only uncompressed ones by default and would
#: try to decompress the files, which it cannot do for these).
STORESCU_PROPOSE = {"none": [], "jpeg2000": ["-xv"], "jpegls": ["-xt"]}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--series", type=int, default=10, help="series in the study (default: 10)")
    p.add_argument("--per-series", type=int, default=10, help="instances per series (default: 10)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default: 512)")
    p.add_argument("--checkpoint", help="model (default: a random-init one at --input-size)")
    p.add_argument("--input-size", type=int, default=224, help="input size of the random-init model (default: 224)")
    p.add_argument("--timeout", type=float, default=900, help="give up after this many seconds (default: 900)")
    p.add_argument("--sc-png", type=Path, help="save one Secondary Capture the node stored, as PNG")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    p.add_argument("--compress", choices=sorted(COMPRESSIONS), default="none",
                   help="transfer syntax of the files (lossless; default: none, Explicit VR Little Endian)")
    p.add_argument("--senders", type=int, default=1,
                   help="storescu processes sending at once, each its share of the series (default: 1)")
    p.add_argument("--series-timeout", type=float, default=5.0,
                   help="the node's --series-timeout: storescu sends every series on one association, so each "
                        "series but the last is complete only after this idle time (default: 5)")
    return p


def write_files(folder: Path, series: int, per_series: int, size: int,
                compress: str = "none") -> tuple[list[list[Path]], str]:
    """The study's files, one list per series, in ``compress``'s transfer syntax (pydicom's encoders)."""
    folder.mkdir(parents=True, exist_ok=True)
    study = dicom_study(series, per_series, size=size, body_part="CHEST")
    paths: list[list[Path]] = [[] for _ in range(series)]
    for k, ds in enumerate(study):
        if COMPRESSIONS[compress] is not None:
            ds.compress(COMPRESSIONS[compress])
        paths[k // per_series].append(folder / f"i{k:04d}.dcm")
        ds.save_as(paths[k // per_series][-1], enforce_file_format=True)
    return paths, str(study[0].StudyInstanceUID)


def send_all(port: int, series_paths: list[list[Path]], senders: int, compress: str = "none") -> None:
    """``senders`` storescu processes at once, series dealt out in turn, each on its own association."""
    shares = [[p for paths in series_paths[k::senders] for p in paths] for k in range(senders)]
    runs = [subprocess.Popen([dcmtk("storescu"), *STORESCU_PROPOSE[compress], "-aec", "MEDISCAN", "127.0.0.1",
                              str(port), *map(str, share)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for share in shares if share]
    for run in runs:
        _, err = run.communicate()
        if run.returncode != 0:
            raise SystemExit(f"storescu failed: {err[-2000:]}")


def baseline(predictor: Predictor, paths: list[Path]) -> float:
    """Instances/s of Predictor.predict on the files' bytes, one at a time."""
    data = [p.read_bytes() for p in paths]
    predictor.predict(data[0])                                    # warm-up
    t0 = time.perf_counter()
    for raw in data:
        predictor.predict(raw)
    return len(data) / (time.perf_counter() - t0)


def save_sc_png(orthanc, instances: list[dict], target: Path) -> None:
    """Render the first Secondary Capture among ``instances`` from its DICOM pixel data to a PNG file."""
    import io

    import pydicom
    from PIL import Image

    for instance in instances:
        ds = pydicom.dcmread(io.BytesIO(orthanc.request("GET", f"/instances/{instance['ID']}/file")))
        if ds.Modality != "SR":
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ds.pixel_array).save(target, optimize=True)
            print(f"saved     {target} ({ds.Columns} x {ds.Rows}, from the SC's pixel data)")
            return
    print("WARNING: no Secondary Capture to save")


def through_node(predictor: Predictor, series_paths: list[list[Path]], study_uid: str, tmp: Path, timeout: float,
                 sc_png: Path | None = None, series_timeout: float = 5.0,
                 senders: int = 1, compress: str = "none") -> tuple[float, int, dict]:
    """(seconds from first send to last result in Orthanc, results found, node summary)."""
    n_series, n = len(series_paths), sum(map(len, series_paths))
    with orthanc_server(tmp / "orthanc") as orthanc:
        config = NodeConfig(port=0, series_timeout=series_timeout, max_slices=max(16, n),
                            max_associations=max(8, senders),
                            destination=CStoreDestination(orthanc.aet, "127.0.0.1", orthanc.port))
        node = DicomNode(predictor, config, version="bench").start()
        try:
            t0 = time.perf_counter()
            send_all(node.port, series_paths, senders, compress)
            print(f"sent      {n} instances with {senders} storescu at once in {time.perf_counter() - t0:.1f} s")
            try:
                orthanc.wait_for(study_uid, 2 * n_series, timeout=timeout)
            except TimeoutError as exc:
                print(f"WARNING: {exc}")
            elapsed = time.perf_counter() - t0
            instances = orthanc.study_instances(study_uid)
            results = len(instances)                              # Orthanc holds only the results
            if sc_png is not None:
                save_sc_png(orthanc, instances, sc_png)
        finally:
            summary = node.stop()
    return elapsed, results, summary


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    missing = orthanc_missing() or tools_missing("storescu")
    if missing:
        print(f"cannot run: {missing}", file=sys.stderr)
        return 2
    quiet_libraries()
    import torch
    torch.set_num_threads(max(1, args.threads))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        checkpoint = args.checkpoint or write_tiny_checkpoint(tmp / "bench.safetensors", input_size=args.input_size,
                                                              with_ood=True)
        predictor = Predictor(checkpoint)
        series_paths, study_uid = write_files(tmp / "in", args.series, args.per_series, args.size, args.compress)
        paths = [p for files in series_paths for p in files]
        n = len(paths)
        print(f"{args.series} series x {args.per_series} instances, {args.size} x {args.size} CR "
              f"({args.compress}, {sum(p.stat().st_size for p in paths) / n / 2**20:.1f} MB each), "
              f"{args.senders} sender(s); model "
              f"{Path(checkpoint).name} (input {predictor.input_size} px) on {predictor.device}, "
              f"{torch.get_num_threads()} torch thread(s), series timeout {args.series_timeout:g} s")
        before = baseline(predictor, paths)
        elapsed, results, summary = through_node(predictor, series_paths, study_uid, tmp, args.timeout,
                                                 args.sc_png, args.series_timeout, args.senders, args.compress)
        after = baseline(predictor, paths)
        reference = (before + after) / 2
        print(f"baseline  Predictor.predict, one at a time: {reference:.2f} instances/s (before the node "
              f"{before:.2f}, after {after:.2f})")
        rate = n / elapsed
        lost = 2 * args.series - results
        print(f"node      storescu -> MediScan -> Orthanc: {rate:.2f} instances/s, {args.series / elapsed:.2f} "
              f"series/s ({elapsed:.1f} s for {n} instances)")
        print(f"ratio     node / baseline = {rate / reference:.2f} (goal >= 0.8)")
        print(f"results   {results} of {2 * args.series} stored in Orthanc; lost: {lost}; undelivered: "
              f"{len(summary['undelivered'])}; failed series: {len(summary['failed'])}")
    return 0 if lost == 0 and not summary["undelivered"] else 1


if __name__ == "__main__":
    sys.exit(main())

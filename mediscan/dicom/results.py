"""A series' analysis -> the two DICOM objects MediScan stores back: Secondary Capture and Structured Report."""
from __future__ import annotations

import numpy as np

from mediscan.core.dicom_header import HeaderCheck
from mediscan.dicom.secondary_capture import NOT_FOR_DIAGNOSIS, burn_in, secondary_capture
from mediscan.dicom.series import SeriesResult
from mediscan.dicom.structured_report import SeriesFinding, structured_report
from mediscan.dicom.uids import result_uids

__all__ = ["ALGORITHM_NAME", "result_datasets", "warm_up"]

ALGORITHM_NAME = "MediScan organ classifier"


def _label_lines(result: SeriesResult) -> list[str]:
    f = result.finding
    if f.top_class is None:  # the modality gate stopped every instance: no class, no heatmap
        return ["MediScan: not analysed (out of scope)", f.verdict_reason, NOT_FOR_DIAGNOSIS]
    lines = [f"MediScan: {f.top_class} {f.probabilities[f.top_class]:.0%}",
             f"verdict: {f.verdict}; {result.header_check.describe()}",
             f"Grad-CAM of '{f.top_class}', {f.analysed} image(s) analysed"]
    if f.gated:
        lines[-1] += f", {f.gated} stopped by the modality gate"
    return lines + [NOT_FOR_DIAGNOSIS]


def result_datasets(result: SeriesResult, *, checkpoint_sha256: str, version: str) -> list:
    """``[secondary_capture, structured_report]`` for ``result``, with the deterministic UIDs of its source
    series and checkpoint (a re-run replaces, never duplicates)."""
    uids = result_uids(result.finding.source_series_uid, checkpoint_sha256)
    f = result.finding
    answer = "not analysed" if f.top_class is None else f.top_class
    description = f"MediScan {answer} ({f.verdict}) NOT FOR DIAGNOSTIC USE"
    sc = secondary_capture(result.representative, burn_in(result.overlay, _label_lines(result)),
                           series_uid=uids.sc_series, instance_uid=uids.sc_instance, description=description,
                           version=version)
    sr = structured_report(result.evidence, f, series_uid=uids.sr_series, instance_uid=uids.sr_instance,
                           algorithm=(ALGORITHM_NAME, version, checkpoint_sha256), description=description)
    return [sc, sr]


def warm_up() -> None:
    """Build a throwaway SC and SR for a made-up 8 x 8 image: highdicom reads its tables of the standard on
    first use (seconds on a small CPU), which would otherwise delay the node's first result."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ComputedRadiographyImageStorage, generate_uid

    ref = Dataset()
    ref.SOPClassUID, ref.SOPInstanceUID, ref.Modality = ComputedRadiographyImageStorage, generate_uid(), "CR"
    ref.StudyInstanceUID, ref.SeriesInstanceUID = generate_uid(), generate_uid()
    finding = SeriesFinding("bone", {"bone": 1.0}, "confident", "warm-up", "no_header", "", 1, ref.SeriesInstanceUID)
    result = SeriesResult(finding, HeaderCheck("no_header"), ref, np.zeros((8, 8, 3), np.uint8), [ref],
                          ref.StudyInstanceUID)
    result_datasets(result, checkpoint_sha256="0" * 64, version="warm-up")

"""A series' analysis -> the two DICOM objects MediScan stores back: Secondary Capture and Structured Report."""
from __future__ import annotations

from mediscan.dicom.secondary_capture import NOT_FOR_DIAGNOSIS, burn_in, secondary_capture
from mediscan.dicom.series import SeriesResult
from mediscan.dicom.structured_report import structured_report
from mediscan.dicom.uids import result_uids

__all__ = ["ALGORITHM_NAME", "result_datasets"]

ALGORITHM_NAME = "MediScan organ classifier"


def _label_lines(result: SeriesResult) -> list[str]:
    f = result.finding
    return [f"MediScan: {f.top_class} {f.probabilities[f.top_class]:.0%}",
            f"verdict: {f.verdict}; {result.header_check.describe()}",
            f"Grad-CAM of '{f.top_class}', {f.analysed} image(s) analysed",
            NOT_FOR_DIAGNOSIS]


def result_datasets(result: SeriesResult, *, checkpoint_sha256: str, version: str) -> list:
    """``[secondary_capture, structured_report]`` for ``result``, with the deterministic UIDs of its source
    series and checkpoint (a re-run replaces, never duplicates)."""
    uids = result_uids(result.finding.source_series_uid, checkpoint_sha256)
    f = result.finding
    description = f"MediScan {f.top_class} ({f.verdict}) NOT FOR DIAGNOSTIC USE"
    sc = secondary_capture(result.representative, burn_in(result.overlay, _label_lines(result)),
                           series_uid=uids.sc_series, instance_uid=uids.sc_instance, description=description,
                           version=version)
    sr = structured_report(result.evidence, f, series_uid=uids.sr_series, instance_uid=uids.sr_instance,
                           algorithm=(ALGORITHM_NAME, version, checkpoint_sha256), description=description)
    return [sc, sr]

"""Synthetic data for MediScan's tests and benchmarks: learnable pattern images, tiny datasets and
checkpoints, out-of-scope detectors and in-memory DICOM files. Nothing here touches the network or real data.

Development helpers, not part of the product: nothing under ``mediscan`` but ``devtools`` imports this.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mediscan.core.checkpoint import new_metadata, save_checkpoint
from mediscan.core.model import FEATURE_CHANNELS, build_model
from mediscan.core.ood import DEFAULT_LAYERS as DEFAULT_OOD_LAYERS
from mediscan.core.ood import OODDetector, fit_ood
from mediscan.core.preprocessing import PreprocessConfig

CLASSES = ("bone", "brain", "heart", "lungs")
#: The ``weight_source`` that ``build_model(..., weights="none")`` reports.
RANDOM_INIT = "none (random initialisation)"
#: Fake patient fields for DICOM files whose patient data must never reach a log or a report.
FAKE_PATIENT = {"patient_name": "Doe^Jane", "patient_id": "SECRET123", "patient_birth_date": "19700101"}


def pattern_image(label: int, size: int = 40, rng: np.random.Generator | None = None) -> np.ndarray:
    """A uint8 image whose class is easy to learn: each class has its own texture, plus noise and jitter."""
    rng = rng or np.random.default_rng()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if label == 0:
        base = 0.5 + 0.5 * np.sin(yy / 2.0 + phase)                     # horizontal stripes
    elif label == 1:
        base = 0.5 + 0.5 * np.sin(xx / 2.0 + phase)                     # vertical stripes
    elif label == 2:
        cy, cx = size / 2 + rng.uniform(-3, 3, 2)
        base = (((yy - cy) ** 2 + (xx - cx) ** 2) < (size / 4) ** 2).astype(np.float32)  # bright disc
    else:
        base = ((xx + yy) / (2 * size)).astype(np.float32)               # smooth diagonal ramp
    noisy = base * 0.8 + rng.normal(0, 0.05, base.shape)
    return (np.clip(noisy, 0, 1) * 255).astype(np.uint8)


def make_dataset(root: Path, *, per_class: int = 6, splits=("train", "val", "test"), classes=CLASSES,
                 size: int = 40, seed: int = 0, suffix: str = ".png") -> Path:
    """Write ``root/{split}/{class}/img_k.png`` with learnable synthetic images; returns root."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                Image.fromarray(pattern_image(label % 4, size, rng)).save(folder / f"{name}_{split}_{k}{suffix}")
    return root


# ------------------------------------------------------------------------------------------------ checkpoints

def tiny_model(classes=CLASSES, seed: int = 0) -> torch.nn.Module:
    """A random-initialised DenseNet121 (eval mode) with one output per class; seeds torch's global RNG."""
    torch.manual_seed(seed)
    model, _ = build_model(len(classes), weights="none")
    return model.eval()


#: Channels of the pooled features of each layer the out-of-scope detector reads by default.
OOD_LAYER_CHANNELS = {"denseblock1": 256, "norm5": FEATURE_CHANNELS}
assert tuple(OOD_LAYER_CHANNELS) == DEFAULT_OOD_LAYERS


def random_features_detector(n_classes: int, seed: int = 0) -> OODDetector:
    """An out-of-scope detector (default layers) fitted on uniform random "features" (80 fit, 40 calibration)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(80) % n_classes
    train = {name: torch.rand(80, dim, generator=gen) for name, dim in OOD_LAYER_CHANNELS.items()}
    val = {name: torch.rand(40, dim, generator=gen) for name, dim in OOD_LAYER_CHANNELS.items()}
    return fit_ood(train, labels, val)


def detector_around(model: torch.nn.Module, batch: torch.Tensor, n: int = 200, seed: int = 0) -> OODDetector:
    """An out-of-scope detector (default layers) fitted on jittered copies of the features of ``batch``
    (image k is class k): those images are in scope, unrelated ones are not."""
    with torch.no_grad():
        _, centres = model.tapped_features(batch, DEFAULT_OOD_LAYERS)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(batch)

    def jittered() -> dict[str, torch.Tensor]:
        return {name: c[labels] + torch.randn(n, c.shape[1], generator=gen) * (c.std(0, keepdim=True) * 0.3 + 1e-3)
                for name, c in centres.items()}
    return fit_ood(jittered(), labels, jittered())


def write_tiny_checkpoint(path: str | Path, *, classes=CLASSES, input_size: int = 64, seed: int = 0,
                          with_ood: bool = False, model: torch.nn.Module | None = None,
                          detector: OODDetector | None = None, **meta_extra) -> Path:
    """Save a tiny random-initialised checkpoint at ``path`` and return the path.

    ``seed`` seeds the model's initialisation (``tiny_model``); pass ``model`` instead to save one the
    caller built (``seed`` is then unused). ``with_ood=True`` adds an out-of-scope detector fitted on
    random features (``random_features_detector``); ``detector`` adds one the caller fitted. ``meta_extra``
    goes to ``new_metadata`` (``temperature=``, ``metrics=``, ...).
    """
    if with_ood and detector is not None:
        raise ValueError("pass either with_ood=True or a detector, not both")
    if model is None:
        model = tiny_model(classes, seed)
    if with_ood:
        detector = random_features_detector(len(classes))
    extra = None
    if detector is not None:
        meta_extra["ood"], extra = detector.to_meta(), detector.to_tensors()
    meta = new_metadata(list(classes), PreprocessConfig(input_size), RANDOM_INIT, **meta_extra)
    return save_checkpoint(path, model, meta, extra)


# ------------------------------------------------------------------------------------------------ DICOM

def dicom_bytes(pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2", frames: int = 1,
                modality: str = "CR", patient_name: str | None = None, patient_id: str | None = None,
                patient_birth_date: str | None = None, bits_stored: int = 16) -> bytes:
    """A minimal Part-10 DICOM in memory: uncompressed (Explicit VR Little Endian), 16 bits allocated.

    ``pixels`` is (H, W) or (frames, H, W) and is stored as uint16; ``None`` gives a file without pixel
    data. Patient fields are only written when given (``**FAKE_PATIENT`` for privacy tests).
    """
    from pydicom import dcmwrite
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        ComputedRadiographyImageStorage,
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage if modality == "CR" else SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    for keyword, value in (("PatientName", patient_name), ("PatientID", patient_id),
                           ("PatientBirthDate", patient_birth_date)):
        if value is not None:
            setattr(ds, keyword, value)
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def dicom_study(n_series: int = 1, per_series: int = 3, *, size: int = 64, body_part: str | None = "CHEST",
                modality: str = "CR", seed: int = 0, study_uid: str | None = None) -> list:
    """A study of ``n_series`` x ``per_series`` CR (or SC) instances as pydicom datasets (Part-10 ready,
    Explicit VR Little Endian, 16-bit pattern images of class ``k % 4`` for series ``k``), with the Type 2
    patient/study attributes filled (fake patient: :data:`FAKE_PATIENT`) and ``BodyPartExamined`` when
    given. Used by the DICOM node's tests and benchmark."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        ComputedRadiographyImageStorage,
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    sop_class = ComputedRadiographyImageStorage if modality == "CR" else SecondaryCaptureImageStorage
    out = []
    for k in range(n_series):
        series_uid = generate_uid()
        for i in range(per_series):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
            ds.PatientName, ds.PatientID = FAKE_PATIENT["patient_name"], FAKE_PATIENT["patient_id"]
            ds.PatientBirthDate, ds.PatientSex = FAKE_PATIENT["patient_birth_date"], "F"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
            ds.ReferringPhysicianName, ds.Manufacturer, ds.Modality = "", "Synthetic", modality
            ds.SeriesNumber, ds.InstanceNumber = k + 1, i + 1
            ds.PatientOrientation, ds.ViewPosition, ds.Laterality = "", "", ""
            if modality != "CR":
                ds.ConversionType = "WSD"
            if body_part:
                ds.BodyPartExamined = body_part
                del ds.Laterality  # General Series Laterality: only for paired body parts
            pixels = pattern_image(k % 4, size, rng).astype(np.uint16) * 16
            ds.Rows, ds.Columns = pixels.shape
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = pixels.tobytes()
            out.append(ds)
    return out

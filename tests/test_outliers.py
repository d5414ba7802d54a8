"""Outlier exposure (synthetic outliers, energy-margin loss, BatchNorm statistics after it) and the modalities a checkpoint records."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import densenet121_xray_classifier as cli
from mediscan.core.checkpoint import load_checkpoint, read_metadata
from mediscan.core.dataset import load_split, scan_dataset
from mediscan.core.modality_gate import DEFAULT_MODALITIES
from mediscan.core.pixel_cache import to_model_range
from mediscan.devtools.synthetic import dicom_bytes, make_dataset, pattern_image
from mediscan.inference.predictor import Predictor
from mediscan.training.epochs import calibrate_batchnorm, spread_rows
from mediscan.training.fit import TrainConfig, fit
from mediscan.training.modalities import parse_modalities, training_modalities
from mediscan.training.outliers import (
    DEFAULT_OUTLIER_KINDS,
    OUTLIER_KINDS,
    energy,
    energy_margin_loss,
    make_outliers,
    outlier_exposure_loss,
    parse_outlier_kinds,
)

TINY = dict(weights="none", input_size=32, head_epochs=1, finetune_epochs=1, batch_size=8, progress=False,
            workers=1, gallery=False)


def _batch(n: int = 40, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Model-range images with real structure (stripes, discs, ramps) -- not noise, which anything resembles."""
    rng = np.random.default_rng(seed)
    pixels = np.stack([pattern_image(k % 4, size, rng) for k in range(n)]).astype(np.float32) / 255.0
    return torch.from_numpy(pixels)[:, None] * 2048.0 - 1024.0


def _outliers(seed: int, images: torch.Tensor, count: int | None = None):
    return make_outliers(images, torch.Generator().manual_seed(seed), count)


def test_outliers_are_deterministic_for_a_seed_and_change_with_it():
    images = _batch()
    first, kinds = _outliers(7, images)
    again, kinds_again = _outliers(7, images)
    other, _ = _outliers(8, images)
    assert torch.equal(first, again) and torch.equal(kinds, kinds_again)
    assert not torch.equal(first, other)


def test_outliers_keep_shape_and_range_cover_every_kind_and_differ_from_their_source():
    images = _batch()
    outliers, kinds = make_outliers(images, torch.Generator().manual_seed(0), 30, OUTLIER_KINDS)
    assert outliers.shape == (30, 1, 32, 32) and outliers.dtype == images.dtype
    assert torch.isfinite(outliers).all() and outliers.min() >= -1024 and outliers.max() <= 1024
    assert set(kinds.tolist()) == set(range(len(OUTLIER_KINDS)))
    change = (outliers - images[:30]).abs().flatten(1).mean(1) / 2048.0       # mean change, as a share of the range
    for kind, name in enumerate(OUTLIER_KINDS):
        assert change[kinds == kind].min() > 0.03, name


def test_patch_shuffle_moves_pixels_without_changing_them_and_mosaics_are_cut_from_the_batch():
    images = _batch()
    outliers, kinds = _outliers(1, images)
    shuffled = (kinds == OUTLIER_KINDS.index("patch_shuffle")).nonzero().flatten()
    assert len(shuffled)
    for row in shuffled.tolist():           # a permutation of tiles: the same multiset of pixel values
        assert torch.allclose(outliers[row].flatten().sort().values, images[row].flatten().sort().values, atol=1e-3)
    for row in (kinds == OUTLIER_KINDS.index("mosaic")).nonzero().flatten().tolist():
        quadrant = outliers[row, 0, :16, :16]
        assert any(torch.allclose(quadrant, image[0, :16, :16], atol=1e-3) for image in images)


def test_energy_and_the_margin_loss_match_hand_computed_values():
    uniform, confident = [0.0, 0.0, 0.0, 0.0], [6.0, 0.0, 0.0, 0.0]
    logits = torch.tensor([uniform, confident])
    lse_confident = 6.0 + math.log(1.0 + 3.0 * math.exp(-6.0))
    assert energy(logits).tolist() == pytest.approx([-math.log(4.0), -lse_confident], abs=1e-6)
    # in-scope confident (E = -6.007 <= -6) and outlier uniform (E = -1.386 >= -2): nothing to push.
    zero = energy_margin_loss(torch.tensor([confident]), torch.tensor([uniform]), margins=(-6.0, -2.0))
    assert float(zero) == 0.0
    # in-scope uniform: (-1.386 + 6)^2; outlier confident: (-2 + 6.007)^2; each side averaged over 2 rows.
    both = energy_margin_loss(logits, logits, margins=(-6.0, -2.0))
    expected = (6.0 - math.log(4.0)) ** 2 / 2 + (lse_confident - 2.0) ** 2 / 2
    assert float(both) == pytest.approx(expected, rel=1e-5) and expected > 0


def test_modalities_flag_is_parsed_and_bad_codes_are_named():
    assert parse_modalities(" dx, cr ,DX") == ["DX", "CR"]
    with pytest.raises(ValueError, match="'C@T'"):
        parse_modalities("CR,c@t")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--modalities", ",,"])
    assert stopped.value.code == 2


def test_training_modalities_come_from_dicom_files_or_the_default(tmp_path):
    pixels = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 50)
    for name, modality in (("a.dcm", "CT"), ("b.dcm", "MR"), ("c.dcm", "CT")):
        (tmp_path / name).write_bytes(dicom_bytes(pixels, modality=modality))
    dicoms = sorted(tmp_path.glob("*.dcm"))
    assert training_modalities(dicoms) == ["CT", "MR"]
    assert training_modalities(dicoms, "XA") == ["XA"]
    png = make_dataset(tmp_path / "png", per_class=1, splits=("train",))
    pngs = sorted(png.rglob("*.png"))
    assert training_modalities(pngs) == list(DEFAULT_MODALITIES)
    assert training_modalities(pngs + dicoms[:1]) == list(DEFAULT_MODALITIES)   # mixed: CT is in it already


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same tiny schedule twice (same seed, same data, outliers drawn alike): the energy term weighted 0,
    and weighted 1 with --modalities. Only that term can tell their stage-2 losses apart."""
    root = tmp_path_factory.mktemp("oe")
    data = make_dataset(root / "dataset", per_class=4, seed=2)
    plain = fit(TrainConfig(data=str(data), out=str(root / "plain"), outlier_exposure=True, oe_weight=0.0, **TINY),
                log=lambda _: None)
    exposed = fit(TrainConfig(data=str(data), out=str(root / "oe"), outlier_exposure=True, oe_weight=1.0,
                              modalities="DX,CR", **TINY), log=lambda _: None)
    return plain, exposed


def test_a_tiny_outlier_exposure_run_trains_end_to_end_and_its_energy_term_acts_in_stage_2(two_runs):
    plain, exposed = two_runs
    assert exposed.best_path.is_file() and exposed.test_metrics is not None
    meta = read_metadata(exposed.best_path)
    assert meta["train_args"]["outlier_exposure"] is True and meta["ood"]["threshold"] > 0
    # With the energy a part, the detector combines by Fisher's method, its reference saved with it.
    assert meta["ood"]["combination"] == "fisher"
    assert meta["ood"]["reference"]["parts"] == ["denseblock1", "norm5", "energy"]
    predictor = Predictor(exposed.best_path, device="cpu")
    assert predictor.ood.combination == "fisher" and predictor.ood.reference.shape[0] == 3
    stage1 = [h["train_loss"] for h in plain.history if h["stage"] == 1]
    assert stage1 == [h["train_loss"] for h in exposed.history if h["stage"] == 1]
    plain2 = [h["train_loss"] for h in plain.history if h["stage"] == 2]
    exposed2 = [h["train_loss"] for h in exposed.history if h["stage"] == 2]
    assert plain2 and exposed2 and plain2 != exposed2          # the energy term is in the stage-2 loss


def test_checkpoints_record_the_modalities_they_were_trained_on(two_runs):
    plain, exposed = two_runs
    assert read_metadata(plain.best_path)["modalities"] == list(DEFAULT_MODALITIES)   # PNG data: the default
    assert read_metadata(exposed.best_path)["modalities"] == ["DX", "CR"]            # the flag overrides it


def _clean_norm0_statistics(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of what the first BatchNorm sees for ``images``, by hand:
    the stem convolution applied to the un-augmented images, no outliers among them."""
    with torch.no_grad():
        stem = model.features.conv0(images)
    per_channel = stem.transpose(0, 1).flatten(1)
    return per_channel.mean(1), per_channel.var(1, unbiased=True)


def test_after_outlier_exposure_the_saved_model_normalises_with_statistics_of_training_images_alone(two_runs):
    """The last epoch (stage 2, outliers in every batch) must leave running statistics that describe the
    clean training images, not the mixed batches; measured on the stem BatchNorm against a hand computation."""
    _, exposed = two_runs
    saved = load_checkpoint(exposed.best_path.with_name("last.safetensors"), torch.device("cpu"))
    assert saved.meta["stage"] == 2
    splits = scan_dataset(exposed.best_path.parent.parent / "dataset", val_fraction=0.15, seed=0)
    train, _ = load_split(splits.split("train"), TINY["input_size"], workers=1)
    assert 0 < len(train) <= TINY["batch_size"] * 4               # one calibration batch: the exact mean
    mean, var = _clean_norm0_statistics(saved.model, to_model_range(train.pixels))
    norm0 = saved.model.features.norm0
    torch.testing.assert_close(norm0.running_mean, mean, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(norm0.running_var, var, rtol=1e-3, atol=1e-3)


def test_batchnorm_calibration_reads_rows_spread_over_the_whole_split_not_its_first_ones():
    assert spread_rows(10, 4).tolist() == [0, 2, 5, 7]
    assert spread_rows(3, 5).tolist() == [0, 1, 2]
    # A split stored class by class: the first half dark, the second bright. The first 8 rows would give -1000.
    images = torch.cat([torch.full((50, 1, 4, 4), -1000.0), torch.full((50, 1, 4, 4), 1000.0)])
    norm = torch.nn.BatchNorm2d(1)
    calibrate_batchnorm(torch.nn.Sequential(norm), images, batch_size=4, device=torch.device("cpu"), max_images=8)
    assert norm.running_mean.item() == pytest.approx(0.0, abs=1e-3)   # rows 0, 12, ..., 87: four dark, four bright
    assert norm.momentum == 0.1 and norm.training                      # restored as they were


def test_outliers_can_be_drawn_from_a_subset_of_kinds_and_training_draws_the_default_five():
    images = _batch(64)
    _, kinds = make_outliers(images, torch.Generator().manual_seed(3), kinds=("mosaic", "texture"))
    assert set(kinds.tolist()) == {OUTLIER_KINDS.index("mosaic"), OUTLIER_KINDS.index("texture")}
    assert parse_outlier_kinds(TrainConfig().oe_kinds) == DEFAULT_OUTLIER_KINDS == OUTLIER_KINDS[:5]
    _, default_kinds = _outliers(4, images)           # 64 draws: every allowed kind appears, no other
    assert set(default_kinds.tolist()) == set(range(5))                # neither blends nor dead leaves


def test_outlier_kind_names_are_parsed_and_bad_ones_are_named(capsys):
    assert parse_outlier_kinds("warp, patch_shuffle") == ("patch_shuffle", "warp")
    assert parse_outlier_kinds("ALL") == OUTLIER_KINDS
    with pytest.raises(ValueError, match="unknown kind swirl.*patch_shuffle, phase_scramble, mosaic, warp, texture, blend, dead_leaves"):
        parse_outlier_kinds("warp,swirl")
    with pytest.raises(SystemExit):
        cli.main(["--data", "nowhere", "--outlier-exposure", "--oe-kinds", "swirl"])
    assert "unknown kind swirl" in capsys.readouterr().err
    help_text = cli.get_args_parser().format_help()
    assert all(kind in help_text for kind in OUTLIER_KINDS)        # the flag's help lists every kind there is


class Recorder(torch.nn.Module):
    """Keeps what the network was shown; answers 4 zero logits per image."""
    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.bias.expand(len(x), 4)


def test_the_training_loss_draws_outliers_of_the_configured_kinds_only():
    images, labels = _batch(8), torch.arange(8) % 4
    config = TrainConfig(data="unused", outlier_exposure=True, oe_kinds="texture", amp=False)
    network = Recorder()
    outlier_exposure_loss(network, images, labels, torch.nn.CrossEntropyLoss(), config,
                          torch.Generator().manual_seed(5), torch.device("cpu"))
    expected, _ = make_outliers(images, torch.Generator().manual_seed(5), 4, ("texture",))
    torch.testing.assert_close(network.seen[8:], expected)


def _blend_weight(outlier: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> float | None:
    """The weight w with outlier = w * first + (1 - w) * second (unit-range images), or None when no w fits."""
    unit = [(image.double() + 1024.0) / 2048.0 for image in (outlier, first, second)]
    difference = unit[1] - unit[2]
    if float(difference.abs().max()) < 1e-3:
        return None
    w = float(((unit[0] - unit[2]) * difference).sum() / (difference * difference).sum())
    fits = float((unit[0] - (w * unit[1] + (1 - w) * unit[2])).abs().max()) < 1e-4
    return w if fits else None


def _blend_partners(outliers: torch.Tensor, images: torch.Tensor) -> list[tuple[int, float]]:
    """For each outlier i (made from images[i]): the one other image j it is a blend with, and the weight."""
    found = []
    for i, outlier in enumerate(outliers):
        fits = [(j, w) for j in range(len(images)) if j != i
                for w in [_blend_weight(outlier, images[i], images[j])] if w is not None]
        assert len(fits) == 1, f"outlier {i}: {len(fits)} partners fit"
        found.append(fits[0])
    return found


def test_blends_overlay_an_image_of_another_class_when_the_batch_has_one():
    images, labels = _batch(16), torch.arange(16) % 4
    blends, kinds = make_outliers(images, torch.Generator().manual_seed(11), kinds=("blend",), labels=labels)
    assert set(kinds.tolist()) == {OUTLIER_KINDS.index("blend")}
    partners = _blend_partners(blends, images)
    assert all(labels[j] != labels[i] for i, (j, _) in enumerate(partners))
    weights = [w for _, w in partners]
    assert 0.35 <= min(weights) and max(weights) <= 0.65 and max(weights) - min(weights) > 0.1
    # One class in the batch: any other image will do -- never the image itself (that is no outlier).
    alike, _ = make_outliers(images, torch.Generator().manual_seed(11), kinds=("blend",), labels=torch.zeros(16))
    _blend_partners(alike, images)


def test_dead_leaves_are_flat_grey_discs_that_owe_nothing_to_the_batch():
    images = _batch(16, size=64)
    leaves, _ = make_outliers(images, torch.Generator().manual_seed(12), kinds=("dead_leaves",))
    from_other, _ = make_outliers(-images, torch.Generator().manual_seed(12), kinds=("dead_leaves",))
    assert torch.equal(leaves, from_other)                 # no source pixels in them
    unit = (leaves[:, 0] + 1024.0) / 2048.0
    flat = ((unit[:, 1:, 1:] - unit[:, 1:, :-1]).abs() < 1e-4) & ((unit[:, 1:, 1:] - unit[:, :-1, 1:]).abs() < 1e-4)
    for image, inside in zip(unit, flat):
        levels = torch.unique((image[1:, 1:][inside] * 1e4).round())
        assert inside.float().mean() > 0.2 and len(levels) >= 10       # many leaves, each one flat grey
        assert float(image.max() - image.min()) > 0.5


def test_the_training_loss_blends_across_classes_with_the_batch_labels():
    images = _batch(8)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1])      # only image 7 is of another class than the first four
    network = Recorder()
    outlier_exposure_loss(network, images, labels, torch.nn.CrossEntropyLoss(),
                          TrainConfig(data="unused", outlier_exposure=True, oe_kinds="blend", amp=False),
                          torch.Generator().manual_seed(6), torch.device("cpu"))
    outliers = network.seen[8:]
    assert len(outliers) == 4                              # oe_fraction 0.5 of the batch
    assert [j for j, _ in _blend_partners(outliers, images)] == [7, 7, 7, 7]

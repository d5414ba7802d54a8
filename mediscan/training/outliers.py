"""Outlier exposure: synthetic "none of these" images made from training images, and the energy-margin loss.

Why: a four-class softmax trained on organs only ever learns to tell organs apart, so whatever it has
never seen (a spine film, a texture, a page of text) lands somewhere among them, often confidently.
Outlier exposure (Hendrycks et al. 2019) shows the network examples of "not an organ" while it trains and
asks it to answer them differently. Here the examples are made on the fly from the training batch itself
-- never from the benchmark or ``near_ood`` images, which only measure -- so nothing is downloaded and no
outlier set has to be shipped (synthetic-outlier training: Narayanaswamy et al., ICCV-W 2023).

Kinds (:data:`OUTLIER_KINDS`). The first five keep local image statistics but destroy anatomy:

* ``patch_shuffle``: the image cut into 4x4 tiles, tiles permuted (texture kept, layout gone);
* ``phase_scramble``: Fourier magnitude kept, phase randomised (same spectrum, no structure);
* ``mosaic``: quadrants cut from four different images of the batch (mixes of classes);
* ``warp``: a strong sinusoidal displacement field (non-anatomical bending);
* ``texture``: procedural band-limited noise plus oriented stripes (no source image at all).

The last two aim at what gets through in practice (real anatomy of other body parts, photographs):

* ``blend``: the image overlaid on one of another class of the batch, weights 0.35-0.65 -- whole, real
  anatomy, but of no single class (mix-up as an outlier, as in MixOE, Zhang et al. 2023);
* ``dead_leaves``: occluding grey discs with power-law radii, the scale statistics of photographs without a
  photograph (Baradad et al. 2021 pretrain on such images).

Loss (:func:`energy_margin_loss`, Liu et al. 2020, "Energy-based out-of-distribution detection"): with the
free energy E(x) = -logsumexp(logits), in-distribution images are pushed below ``margin_in`` and
outliers above ``margin_out`` by squared hinges. It keeps the four outputs, so no consumer of the
classifier (CSV, API, DICOM SR, Grad-CAM) changes; an extra "none of these" class would change all of them.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from mediscan.core.ood import free_energy as energy
from mediscan.core.preprocessing import scale_to_model_range, scale_to_unit_range

__all__ = ["OUTLIER_KINDS", "DEFAULT_OUTLIER_KINDS", "make_outliers", "parse_outlier_kinds", "energy", "energy_margin_loss", "DEFAULT_MARGINS"]

OUTLIER_KINDS = ("patch_shuffle", "phase_scramble", "mosaic", "warp", "texture", "blend", "dead_leaves")
#: What training draws unless told otherwise (``TrainConfig.oe_kinds``): blends and dead leaves did not help
#: on three seeds of the short CPU schedule (docs/benchmarks.md, "Blends and dead leaves"), so they are opt-in.
DEFAULT_OUTLIER_KINDS = OUTLIER_KINDS[:5]
#: (margin_in, margin_out) of the energy hinge. E = -log 4 = -1.39 for uniform logits; a confident
#: in-distribution answer (top logit ~6 above the rest) has E ~ -6.
DEFAULT_MARGINS = (-6.0, -2.0)


@functools.lru_cache(maxsize=None)
def parse_outlier_kinds(text: str) -> tuple[str, ...]:
    """``"all"`` or comma-separated names from :data:`OUTLIER_KINDS` -> those kinds, in :data:`OUTLIER_KINDS`
    order. Raises ``ValueError`` naming what is unknown and what there is. Cached: the loss asks every step."""
    if text.strip().lower() == "all":
        return OUTLIER_KINDS
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in OUTLIER_KINDS]
    if unknown or not names:
        raise ValueError(f"--oe-kinds: {'unknown kind ' + ', '.join(unknown) if unknown else 'no kind given'}; "
                         f"use 'all' or a comma-separated list of {', '.join(OUTLIER_KINDS)}")
    return tuple(kind for kind in OUTLIER_KINDS if kind in names)


@functools.lru_cache(maxsize=None)
def _kind_indices(kinds: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """``kinds`` as indices into :data:`OUTLIER_KINDS`, on ``device`` -- made once, not copied there every step."""
    return torch.tensor([OUTLIER_KINDS.index(kind) for kind in kinds], device=device)


def _rand(shape, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _patch_shuffle(x: torch.Tensor, generator, grid: int = 4) -> torch.Tensor:
    n, c, h, w = x.shape
    th, tw = h // grid, w // grid
    body = x[:, :, :th * grid, :tw * grid]
    tiles = body.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, th, tw)
    order = _rand((n, grid * grid), generator, x.device).argsort(dim=1)
    tiles = tiles[torch.arange(n, device=x.device)[:, None], order]
    body = tiles.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, th * grid, tw * grid)
    out = x.clone()
    out[:, :, :th * grid, :tw * grid] = body
    return out


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Each image stretched to [0, 1] (a constant image becomes 0)."""
    flat = x.flatten(1)
    low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return (x - low) / (high - low).clamp_min(1e-6)


def _phase_scramble(x: torch.Tensor, generator) -> torch.Tensor:
    # The phase of real noise's spectrum is Hermitian-symmetric, so the inverse transform stays real.
    noise_phase = torch.angle(torch.fft.fft2(_rand(x.shape, generator, x.device)))
    spectrum = torch.fft.fft2(x)
    return _normalise(torch.fft.ifft2(spectrum.abs() * torch.exp(1j * noise_phase)).real)


def _mosaic(x: torch.Tensor, generator, pool: torch.Tensor) -> torch.Tensor:
    """Quadrants from four random images of ``pool`` (the whole batch): cut-and-paste mixes of classes."""
    n, _, h, w = x.shape
    picks = (_rand((4, n), generator, x.device) * len(pool)).long().clamp_max(len(pool) - 1)
    out = x.clone()
    hh, hw = h // 2, w // 2
    boxes = ((slice(0, hh), slice(0, hw)), (slice(0, hh), slice(hw, w)),
             (slice(hh, h), slice(0, hw)), (slice(hh, h), slice(hw, w)))
    for quadrant, (rows, cols) in enumerate(boxes):
        out[:, :, rows, cols] = pool[picks[quadrant]][:, :, rows, cols]
    return out


def _warp(x: torch.Tensor, generator) -> torch.Tensor:
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                            indexing="ij")
    params = _rand((n, 6), generator, x.device)
    amp = (0.15 + 0.2 * params[:, 0:2]).view(n, 2, 1, 1)             # displacement: 7-17 % of the side
    freq = (2.0 + 4.0 * params[:, 2:4]).view(n, 2, 1, 1) * math.pi
    phase = (params[:, 4:6] * 2 * math.pi).view(n, 2, 1, 1)
    dx = amp[:, 0] * torch.sin(freq[:, 0] * ys + phase[:, 0])
    dy = amp[:, 1] * torch.sin(freq[:, 1] * xs + phase[:, 1])
    grid = torch.stack([xs + dx, ys + dy], dim=-1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)


def _texture(x: torch.Tensor, generator) -> torch.Tensor:
    n, c, h, w = x.shape
    coarse = _rand((n, c, max(h // 8, 2), max(w // 8, 2)), generator, x.device)
    blobs = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                            torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    params = _rand((n, 3), generator, x.device)
    angle, period = params[:, 0] * math.pi, 3.0 + 12.0 * params[:, 1]
    proj = xs * torch.cos(angle).view(n, 1, 1) + ys * torch.sin(angle).view(n, 1, 1)
    stripes = torch.sin(2 * math.pi * proj / period.view(n, 1, 1)).unsqueeze(1)
    mix = params[:, 2].view(n, 1, 1, 1)
    return _normalise(mix * blobs + (1 - mix) * 0.5 * (stripes + 1))


def _partners(count: int, labels: torch.Tensor, generator, device) -> torch.Tensor:
    """A partner row for each of the first ``count`` rows of a pool of ``len(labels)`` images, drawn at random:
    a row of another class where the pool has one, else any other row (itself only in a pool of one)."""
    size = len(labels)
    scores = _rand((count, size), generator, device) + 1.0          # in [1, 2): any row may win
    rows = torch.arange(count, device=device)
    scores[rows, rows] = 0.0                                          # itself: only when nothing else is there
    other_class = labels[None, :] != labels[:count, None]
    scores = scores + 2.0 * (other_class & other_class.any(1, keepdim=True))   # another class wins when it exists
    return scores.argmax(1)


def _blend(x: torch.Tensor, generator, pool: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """Each image overlaid on its partner, weights 0.35-0.65: two anatomies in one film (a double exposure)."""
    weight = (0.35 + 0.3 * _rand((len(x), 1, 1, 1), generator, x.device)).to(x.dtype)
    return weight * x + (1 - weight) * pool[partners]


def _dead_leaves(x: torch.Tensor, generator, discs: int = 128) -> torch.Tensor:
    """Occluding discs of random grey with power-law radii (the "dead leaves" model): the edge and scale
    statistics of natural photographs (Lee, Mumford & Huang 2001) with nothing anatomical in them. 128 discs
    of radius 5-50 % of the side cover the frame about three times over (a few per cent stays background);
    a 3x3 box blur softens the edges as a lens would."""
    n, c, h, w = x.shape
    side = float(min(h, w))
    low, high = (0.05 * side) ** -2, (0.5 * side) ** -2
    radius = (low - _rand((n, discs), generator, x.device) * (low - high)).rsqrt()    # p(r) ~ r^-3 on [5 %, 50 %]
    centre_y = (_rand((n, discs), generator, x.device) * 1.2 - 0.1) * h
    centre_x = (_rand((n, discs), generator, x.device) * 1.2 - 0.1) * w
    grey = _rand((n, discs + 1), generator, x.device)                               # column 0: the background
    ys = torch.arange(h, device=x.device, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, device=x.device, dtype=torch.float32).view(1, 1, 1, w)
    # Disc by disc into one (n, h, w) map, the last dropped on top (0: none): one disc's mask at a time, not
    # all 128 at once (58 MB per image at 224 px).
    top = torch.zeros((n, h, w), dtype=torch.long, device=x.device)
    for disc in range(discs):
        covered = ((ys[:, 0] - centre_y[:, disc, None, None]) ** 2 + (xs[:, 0] - centre_x[:, disc, None, None]) ** 2
                   <= radius[:, disc, None, None] ** 2)
        top[covered] = disc + 1
    painted = grey.gather(1, top.flatten(1)).view(n, 1, h, w)
    painted = F.avg_pool2d(painted, 3, stride=1, padding=1, count_include_pad=False)
    return painted.expand(n, c, h, w).to(x.dtype)


def make_outliers(images: torch.Tensor, generator: torch.Generator | None = None,
                  count: int | None = None, kinds: tuple[str, ...] = DEFAULT_OUTLIER_KINDS,
                  labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` (default: all) synthetic outliers from a batch of model-range images ``(B, 1, S, S)``.

    Returns ``(outliers, kinds)``: outliers ``(count, 1, S, S)`` in [-1024, 1024] on the batch's device,
    and each one's index into :data:`OUTLIER_KINDS`. The i-th outlier is made from ``images[i]`` (mosaics
    and blends also from other images of the batch). ``generator`` must live on the batch's device; a generator
    seeded the same way gives the same outliers. ``kinds``: the kinds to draw from (each outlier's kind is drawn
    uniformly among them), e.g. all but one to see how the detector does on a kind it never trained on.
    ``labels``: the batch's classes, so that a blend overlays two classes (without them, any two images).
    """
    if images.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    count = len(images) if count is None else min(int(count), len(images))
    pool = scale_to_unit_range(images).clamp(0.0, 1.0)
    source = pool[:count]
    allowed = _kind_indices(tuple(kinds), images.device)
    drawn = (_rand((count,), generator, images.device) * len(allowed)).long().clamp_max(len(allowed) - 1)
    kinds = allowed[drawn]
    out = torch.empty_like(source)
    # Without labels every image counts as its own class: a blend then pairs any two images.
    classes = torch.arange(len(pool), device=images.device) if labels is None else labels.to(images.device)
    makers = {  # each takes the chosen source images and the mask that chose them
        "patch_shuffle": lambda x, _: _patch_shuffle(x, generator),
        "phase_scramble": lambda x, _: _phase_scramble(x, generator),
        "mosaic": lambda x, _: _mosaic(x, generator, pool),
        "warp": lambda x, _: _warp(x, generator),
        "texture": lambda x, _: _texture(x, generator),
        "blend": lambda x, chosen: _blend(x, generator, pool, _partners(count, classes, generator, x.device)[chosen]),
        "dead_leaves": lambda x, _: _dead_leaves(x, generator),
    }
    for kind, name in enumerate(OUTLIER_KINDS):   # in this order, so that a seed draws the same outliers
        chosen = kinds == kind
        if bool(chosen.any()):
            out[chosen] = makers[name](source[chosen], chosen).to(out.dtype)
    return scale_to_model_range(out.clamp(0.0, 1.0)), kinds


def energy_margin_loss(in_logits: torch.Tensor, out_logits: torch.Tensor,
                       margins: tuple[float, float] = DEFAULT_MARGINS) -> torch.Tensor:
    """Liu et al.'s (2020) energy regulariser: mean(relu(E_in - m_in)^2) + mean(relu(m_out - E_out)^2).

    Zero when every in-distribution energy is at most ``margins[0]`` and every outlier energy at least
    ``margins[1]``; an empty side contributes nothing.
    """
    margin_in, margin_out = margins
    total = in_logits.new_zeros((), dtype=torch.float32)
    if len(in_logits):
        total = total + F.relu(energy(in_logits) - margin_in).pow(2).mean()
    if len(out_logits):
        total = total + F.relu(margin_out - energy(out_logits)).pow(2).mean()
    return total


def outlier_exposure_loss(network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          criterion: torch.nn.Module, config, generator: torch.Generator | None,
                          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One stage-2 forward with outlier exposure: the (augmented) batch and ``config.oe_fraction`` of it as
    outliers go through the network together (one pass: BatchNorm sees both); the loss is the cross-entropy
    of the batch plus ``config.oe_weight`` times :func:`energy_margin_loss`. Returns ``(loss, batch logits)``.
    """
    from mediscan.core.runtime import autocast, to_memory_format
    count = max(1, int(round(len(images) * config.oe_fraction)))
    outliers, _ = make_outliers(images, generator, count, parse_outlier_kinds(config.oe_kinds), labels)
    with autocast(device, config.amp):
        logits = network(to_memory_format(torch.cat([images, outliers]), device)).float()
    in_logits, out_logits = logits[:len(images)], logits[len(images):]
    loss = criterion(in_logits, labels) + config.oe_weight * energy_margin_loss(in_logits, out_logits)
    return loss, in_logits

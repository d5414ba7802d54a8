"""Tests for grad_cam.py (Grad-CAM / Grad-CAM++, overlays, faithfulness) and mediscan.gallery.

Everything is synthetic and small (64-96 px inputs, random-init DenseNet121 built once per module).
"""
from __future__ import annotations

import copy
import gc
import io
import threading
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import grad_cam
from grad_cam import DEFAULT_TARGET, CamResult, cam_to_original
from mediscan.core.model import OrganHead, build_model
from mediscan.core.preprocessing import CropGeometry, preprocess
from mediscan.explain.faithfulness import _removal_masks, faithfulness
from mediscan.explain.overlays import colorize, overlay, png_bytes

S = 64                     # DenseNet121 stride 32 -> 2x2 final map
S_REF = 96                 # 3x3 final map for the reference comparison
INNER_LAYER = "features.denseblock4.denselayer16.conv2"


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------

# Concurrency here comes from Python threads, on one intra-op torch thread (conftest's session-wide
# one_torch_thread): OpenMP spin-waiting on a shared, busy 2-core machine makes 2 much slower and noisier.

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net, _ = build_model(4, weights="none")
    net.eval()
    for parameter in net.parameters():   # as a served model would be: nothing may ever write .grad here
        parameter.grad = None
    return net


def smooth_images(batch: int, size: int, seed: int) -> torch.Tensor:
    """(B, 1, size, size) in [-1024, 1024]: a few Gaussian blobs, so maps have structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.zeros((batch, 1, size, size), np.float32)
    for b in range(batch):
        image = np.full((size, size), -0.6, np.float32)
        for _ in range(3):
            cy, cx = rng.uniform(0, size, 2)
            sigma = rng.uniform(size / 12, size / 5)
            image += rng.uniform(0.5, 1.5) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
        image += rng.normal(0, 0.05, (size, size)).astype(np.float32)
        images[b, 0] = np.clip(image, -1, 1) * 1024
    return torch.from_numpy(images)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    low, high = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return (maps - low) / (high - low)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def hook_counts(net: nn.Module) -> int:
    total = 0
    for module in net.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            total += len(getattr(module, name, {}) or {})
    return total


class ToyModel(nn.Module):
    """Duck-typed like OrganClassifier. Channel 0 = brightness above mid-grey, channel 1 = below, on an
    8x8 grid; class 0 = "bright", class 1 = "dark". A bright square alone drives class 0."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(1, 2, kernel_size=1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1) / 1024.0)
        self.features = nn.Sequential(nn.AvgPool2d(8), conv)
        self.head = OrganHead(2, 2)
        with torch.no_grad():
            self.head.fc.weight.copy_(torch.tensor([[32.0, 0.0], [0.0, 32.0]]))
            self.head.fc.bias.zero_()

    def forward(self, x):
        return self.head(self.features(x))


def bright_squares(positions, size=S, side=16) -> torch.Tensor:
    images = torch.zeros(len(positions), 1, size, size)          # mid-grey background (0.0)
    for b, (top, left) in enumerate(positions):
        images[b, 0, top:top + side, left:left + side] = 1024.0
    return images


# --------------------------------------------------------------------------------------------------
# Fast path
# --------------------------------------------------------------------------------------------------

def test_fast_path_returns_prediction_and_map_of_one_forward(model):
    x = smooth_images(3, S, seed=1)
    result = grad_cam.grad_cam(model, x)
    assert isinstance(result, CamResult)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(result.logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(result.class_indices, expected.argmax(1))
    assert result.class_indices.dtype == torch.long
    assert result.cams.shape == (3, S, S) and result.cams.dtype == torch.float32
    assert result.raw_cams.shape == (3, S // 32, S // 32)
    assert result.pooled_features.shape == (3, 1024)
    with torch.no_grad():
        torch.testing.assert_close(result.pooled_features, model.pooled_features(x), rtol=1e-5, atol=1e-5)
    assert float(result.cams.min()) >= 0.0 and float(result.cams.max()) <= 1.0
    for b in range(3):                          # per-item min-max: every non-flat map reaches 0 and 1
        if float(result.raw_cams[b].max() - result.raw_cams[b].min()) > 0:
            assert float(result.cams[b].max()) == pytest.approx(1.0)
            assert float(result.cams[b].min()) == pytest.approx(0.0, abs=1e-6)
    assert not any(t.requires_grad for t in (result.logits, result.cams, result.raw_cams))


def test_fast_path_needs_no_autograd(model):
    x = smooth_images(2, S, seed=2)
    with torch.inference_mode():     # any backward pass would fail in here
        result = grad_cam.grad_cam(model, x, classes=[1, 3])
    assert torch.equal(result.class_indices, torch.tensor([1, 3]))
    assert all(p.grad is None for p in model.parameters())


def test_general_path_works_from_inference_mode_callers(model):
    # Servers run under inference_mode; the general path must still get its gradients, even when the
    # inputs and class indices are inference tensors themselves.
    with torch.inference_mode():
        x = smooth_images(2, S, seed=2).clone()
        classes = model(x).argmax(1)
        result = grad_cam.grad_cam(model, x, classes, target_layer=INNER_LAYER)
    assert torch.equal(result.class_indices, classes)
    assert float(result.cams.max()) == pytest.approx(1.0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_general_path_on_final_layer_equals_fast_path(model, method):
    x = smooth_images(4, S_REF, seed=3)
    classes = [1, 2, 3, 2]          # class 0's map is all zero for this random model: nothing to compare
    fast = grad_cam.grad_cam(model, x, classes, method=method)
    general = grad_cam.grad_cam(model, x, classes, method=method, target_layer=model.head.relu)
    assert general.pooled_features is None
    assert torch.equal(fast.class_indices, general.class_indices)
    torch.testing.assert_close(fast.logits, general.logits, rtol=1e-5, atol=1e-5)
    for b in range(4):
        assert float(fast.raw_cams[b].max() - fast.raw_cams[b].min()) > 0, "degenerate test map"
    # Same map at the feature resolution (normalised) and after upsampling.
    assert float((minmax(fast.raw_cams) - minmax(general.raw_cams)).abs().max()) < 1e-5
    assert float((fast.cams - general.cams).abs().max()) < 1e-5
    # Also unnormalised: the closed-form gradients have the right scale, W_c / (h w).
    torch.testing.assert_close(fast.raw_cams, general.raw_cams, rtol=1e-4, atol=1e-6 * float(fast.raw_cams.max()))


def test_plusplus_is_a_different_map(model):
    x = smooth_images(2, S_REF, seed=4)
    plain = grad_cam.grad_cam(model, x, [1, 2])
    plus = grad_cam.grad_cam(model, x, [1, 2], method="gradcam++")
    assert float((plain.raw_cams - plus.raw_cams).abs().max()) > 1e-3 * float(plain.raw_cams.abs().max())


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_precomputed_feature_map_gives_the_same_result_without_a_forward_pass(model, method):
    """Callers that already ran the backbone (the Predictor, to read earlier layers too) pass its output."""
    x = smooth_images(2, S, seed=6)
    direct = grad_cam.grad_cam(model, x, [1, 3], method=method)
    with torch.no_grad():
        feature_map = model.features(x)
    given = grad_cam.grad_cam(_NoBackbone(model), x, [1, 3], method=method, feature_map=feature_map)
    for field in ("logits", "cams", "raw_cams", "pooled_features"):
        torch.testing.assert_close(getattr(given, field), getattr(direct, field))
    with pytest.raises(ValueError, match="default target"):
        grad_cam.grad_cam(model, x, target_layer=INNER_LAYER, feature_map=feature_map)
    with pytest.raises(ValueError, match="feature_map must be"):
        grad_cam.grad_cam(model, x, feature_map=feature_map[:1])


class _NoBackbone(torch.nn.Module):
    """The model's head, with a backbone that must not run (proves the map is not recomputed)."""

    def __init__(self, model):
        super().__init__()
        self.head = model.head
        self.eval()

    def features(self, x):
        raise AssertionError("the backbone ran although its output was given")


def test_target_layer_by_path_or_module_is_the_same(model):
    x = smooth_images(2, S, seed=5)
    by_path = grad_cam.grad_cam(model, x, 2, target_layer=INNER_LAYER)
    by_module = grad_cam.grad_cam(model, x, 2, target_layer=model.get_submodule(INNER_LAYER))
    assert by_path.raw_cams.shape == (2, S // 32, S // 32)
    torch.testing.assert_close(by_path.cams, by_module.cams)
    assert torch.equal(by_path.class_indices, torch.tensor([2, 2]))
    default = grad_cam.grad_cam(model, x, 2, target_layer=DEFAULT_TARGET)
    assert default.pooled_features is not None          # the string default takes the fast path


# --------------------------------------------------------------------------------------------------
# Agreement with pytorch-grad-cam
# --------------------------------------------------------------------------------------------------

def _reference(net, layer_name, x, classes, cam_class):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    # The reference calls loss.backward() (writes .grad) and model.eval(): give it its own copy.
    twin = copy.deepcopy(net)
    with cam_class(model=twin, target_layers=[twin.get_submodule(layer_name)]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])


@pytest.mark.parametrize("layer", [DEFAULT_TARGET, INNER_LAYER])
def test_gradcam_matches_pytorch_grad_cam(model, layer):
    from pytorch_grad_cam import GradCAM
    x = smooth_images(2, S_REF, seed=6)
    classes = [1, 3]
    reference = _reference(model, layer, x, classes, GradCAM)          # (B, S, S), cv2-upsampled
    ours = grad_cam.grad_cam(model, x, classes, target_layer=None if layer == DEFAULT_TARGET else layer)
    for b in range(2):
        assert np.ptp(reference[b]) > 0.5, "degenerate reference map"
        assert pearson(reference[b], ours.cams[b].numpy()) >= 0.999
        assert float(np.abs(reference[b] - ours.cams[b].numpy()).max()) < 1e-3


def test_gradcam_plusplus_matches_pytorch_grad_cam_when_its_eps_is_negligible(model):
    # pytorch-grad-cam adds eps=1e-6 to the Grad-CAM++ denominator; with this model's tiny gradients
    # (~W/(h w)) that eps dominates. Scaling the logits by 1000 makes it negligible: then both must agree.
    from pytorch_grad_cam import GradCAMPlusPlus
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.head.fc.weight.mul_(1000.0)
        scaled.head.fc.bias.mul_(1000.0)
    x = smooth_images(3, S_REF, seed=7)
    classes = [1, 2, 3]
    reference = _reference(scaled, DEFAULT_TARGET, x, classes, GradCAMPlusPlus)
    ours = grad_cam.grad_cam(scaled, x, classes, method="gradcam++")
    for b in range(3):
        assert np.ptp(reference[b]) > 0.5, "degenerate reference map"
        assert pearson(reference[b], ours.cams[b].numpy()) >= 0.999


# --------------------------------------------------------------------------------------------------
# Arguments and edge cases
# --------------------------------------------------------------------------------------------------

def test_class_argument_forms(model):
    x = smooth_images(3, S, seed=8)
    assert grad_cam.grad_cam(model, x, 2).class_indices.tolist() == [2, 2, 2]
    assert grad_cam.grad_cam(model, x, [0, 3, 1]).class_indices.tolist() == [0, 3, 1]
    assert grad_cam.grad_cam(model, x, torch.tensor([3, 2, 1])).class_indices.tolist() == [3, 2, 1]
    assert grad_cam.grad_cam(model, x, np.array([1, 1, 0]), target_layer=INNER_LAYER).class_indices.tolist() \
        == [1, 1, 0]
    for bad in (4, -1, [0, 1], [0.5, 1, 2], [0, 1, 9]):
        with pytest.raises(ValueError):
            grad_cam.grad_cam(model, x, bad)
    with pytest.raises(ValueError):
        grad_cam.grad_cam(model, x, method="scorecam")
    with pytest.raises(ValueError):
        grad_cam.grad_cam(model, x[0])                           # not a batch
    with pytest.raises(ValueError):
        grad_cam.grad_cam(model, x, target_layer="features.no_such_layer")
    with pytest.raises(ValueError):
        grad_cam.grad_cam(model, x, target_layer=nn.ReLU())      # not part of the model
    assert hook_counts(model) == 0


def test_training_mode_model_is_refused_and_not_changed():
    toy = ToyModel().train()
    with pytest.raises(ValueError, match="eval mode"):
        grad_cam.grad_cam(toy, bright_squares([(0, 0)]))
    assert toy.training                                          # we never flip a shared model's mode
    toy.eval()
    toy.features[1].train()                                      # one stray submodule is enough
    with pytest.raises(ValueError, match="eval mode"):
        grad_cam.grad_cam(toy, bright_squares([(0, 0)]))


@pytest.mark.parametrize("target", [None, "head.relu-module"])
def test_all_zero_map_stays_zero_never_nan(target):
    toy = ToyModel().eval()
    with torch.no_grad():
        toy.head.fc.weight[1] = 0.0           # class 1 does not depend on the features at all
    layer = toy.head.relu if target else None
    result = grad_cam.grad_cam(toy, bright_squares([(8, 8), (40, 16)]), classes=1, target_layer=layer)
    assert not torch.isnan(result.cams).any()
    assert float(result.cams.abs().max()) == 0.0
    heat = colorize(result.cams[0].numpy())
    assert (heat == heat[0, 0]).all()                             # a flat heatmap


def test_flat_maps_are_zero_after_normalisation():
    raw = torch.stack([torch.zeros(3, 3), torch.full((3, 3), 5.0), torch.tensor([[0, 0, 0], [0, 2.0, 0], [0, 0, 0]])])
    cams = grad_cam._upsample_and_normalise(raw, (12, 12))
    assert not torch.isnan(cams).any()
    assert float(cams[0].abs().max()) == 0.0 and float(cams[1].abs().max()) == 0.0
    assert float(cams[2].max()) == pytest.approx(1.0) and float(cams[2].min()) == 0.0


def test_error_inside_general_path_leaves_no_hook(model):
    x = smooth_images(1, S, seed=9)
    with pytest.raises(ValueError):
        grad_cam.grad_cam(model, x, target_layer="head.fc")      # 2-D output: not a feature map
    assert hook_counts(model) == 0
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Shared model across threads, no state left behind
# --------------------------------------------------------------------------------------------------

def test_hook_ignores_forwards_of_other_threads(model):
    x_other, x_own = smooth_images(2, S, seed=10).split(1)
    with torch.no_grad():
        clean = model(x_other)
    layer = model.get_submodule(INNER_LAYER)
    seen = {}
    with grad_cam._LayerCapture(layer) as capture:
        def other_thread():
            with torch.no_grad():
                seen["logits"] = model(x_other)
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert capture.calls == 0 and capture.activation is None     # the other thread's pass is ignored
        torch.testing.assert_close(seen["logits"], clean, rtol=0, atol=0)
        with torch.no_grad():
            model(x_own)
        assert capture.calls == 1 and capture.activation.shape[0] == 1
    assert hook_counts(model) == 0


def test_concurrent_requests_on_one_model_get_their_own_results(model):
    jobs = []
    for i in range(10):
        target = [None, model.head.relu, INNER_LAYER][i % 3]
        method = "gradcam++" if i % 4 == 3 else "gradcam"
        jobs.append((smooth_images(1, S, seed=100 + i), i % 4, target, method))
    alone = [grad_cam.grad_cam(model, x, c, method=m, target_layer=t) for x, c, t, m in jobs]

    barrier = threading.Barrier(len(jobs))
    results: dict[int, list[CamResult]] = {}
    errors: list[BaseException] = []

    def worker(i):
        x, c, t, m = jobs[i]
        try:
            barrier.wait()
            results[i] = [grad_cam.grad_cam(model, x, c, method=m, target_layer=t) for _ in range(3)]
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for i, expected in enumerate(alone):
        for got in results[i]:
            assert torch.equal(got.class_indices, expected.class_indices)
            torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-4)
            assert float((got.cams - expected.cams).abs().max()) < 1e-5
    assert hook_counts(model) == 0
    assert all(p.grad is None for p in model.parameters())


def _tensor_count() -> int:
    gc.collect()
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


def test_no_memory_growth_over_200_calls():
    # grad_cam's own bookkeeping (hooks, captures, autograd graphs, ContextVar) is what could leak; the
    # toy model exercises every path of it and keeps 200 calls under tracemalloc fast.
    toy = ToyModel().eval()
    x = bright_squares([(8, 8)])
    targets = (None, toy.head.relu, "features.1")

    def call(i):
        return grad_cam.grad_cam(toy, x, i % 2, method=grad_cam.METHODS[i % 2], target_layer=targets[i % 3])

    for i in range(10):                     # warm-up: caches, allocator pools
        call(i)
    tensors_before = _tensor_count()
    tracemalloc.start()
    try:
        snapshot = tracemalloc.take_snapshot()
        for i in range(200):
            call(i)
        gc.collect()
        growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snapshot, "filename"))
    finally:
        tracemalloc.stop()
    assert growth < 64 * 1024, f"Python memory grew by {growth} bytes over 200 calls"
    assert _tensor_count() <= tensors_before + 2
    assert hook_counts(toy) == 0


def test_no_state_left_on_the_shared_model(model):
    x = smooth_images(1, 32, seed=11)      # 1x1 final map: the forward is as cheap as it gets
    attributes_before = {name: set(vars(m)) for name, m in model.named_modules()}
    targets = (None, model.head.relu, INNER_LAYER)
    for i in range(3):                     # warm-up
        grad_cam.grad_cam(model, x, target_layer=targets[i])
    tensors_before = _tensor_count()
    for i in range(12):
        grad_cam.grad_cam(model, x, i % 4, method=grad_cam.METHODS[i % 2], target_layer=targets[i % 3])
    assert _tensor_count() <= tensors_before + 2        # nothing kept per call (maps, activations, graphs)
    assert hook_counts(model) == 0
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attributes_before
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


# --------------------------------------------------------------------------------------------------
# Back to the uploaded image; colours; PNG
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,spot", [((120, 200), (30, 140)), ((210, 90), (130, 30))])
def test_hot_spot_lands_where_it_was_in_a_non_square_original(shape, spot):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    image = 0.1 + 0.9 * np.exp(-((yy - spot[0]) ** 2 + (xx - spot[1]) ** 2) / (2 * 5.0 ** 2))
    tensor, geometry = preprocess(image.astype(np.float32), S)
    assert geometry.original_height == shape[0] and geometry.original_width == shape[1]
    cam = (tensor[0].numpy() / 1024 + 1) / 2                       # the spot as the model saw it
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    heat = cam_to_original(cam, geometry)
    assert heat.shape == shape and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs(peak[0] - spot[0]) <= 2 and abs(peak[1] - spot[1]) <= 2, (peak, spot)
    # Outside the crop: nothing.
    inside = np.zeros(shape, bool)
    inside[geometry.top:geometry.top + geometry.side, geometry.left:geometry.left + geometry.side] = True
    assert (heat[~inside] == 0).all() and heat[inside].max() > 0.95


def test_cam_to_original_exact_placement():
    geometry = CropGeometry.for_shape(40, 100)              # side 40, left 30
    cam = np.zeros((4, 4), np.float32)
    cam[1, 3] = 1.0                                         # model pixel (1, 3) = crop rows 10-19, cols 30-39
    heat = cam_to_original(cam, geometry)
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert 10 <= peak[0] <= 19 and 30 + 30 <= peak[1] <= 30 + 39
    assert heat[:, :30].max() == 0 and heat[:, 70:].max() == 0


def test_colorize_is_rgb_not_bgr():
    heat = np.array([[0.0, 1.0]], np.float32)
    rgb = colorize(heat, "jet")
    assert rgb.shape == (1, 2, 3) and rgb.dtype == np.uint8
    hot, cold = rgb[0, 1], rgb[0, 0]
    assert hot[0] > 100 and hot[2] < 30, f"max heat should be red, got {hot}"
    assert cold[2] > 100 and cold[0] < 30, f"zero heat should be blue, got {cold}"
    assert not np.array_equal(colorize(heat, "viridis"), rgb)
    with pytest.raises(ValueError):
        colorize(heat, "no-such-map")
    nan_heat = colorize(np.full((3, 3), np.nan, np.float32))
    assert (nan_heat == nan_heat[0, 0]).all()


def test_overlay_blends_in_rgb():
    image = np.full((8, 10), 0.5, np.float32)
    heat = np.zeros((8, 10), np.float32)
    heat[2, 3] = 1.0
    out = overlay(image, heat, alpha=0.5)
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8
    assert out[2, 3, 0] > out[2, 3, 2]                      # hot pixel: red dominates
    assert out[0, 0, 2] > out[0, 0, 0]                      # cold pixel: blue dominates
    assert (overlay(image, heat, alpha=0.0) == 128).all()   # alpha 0: just the image
    np.testing.assert_array_equal(overlay(image, heat, alpha=1.0), colorize(heat))
    rgb_image = np.zeros((8, 10, 3), np.float32)
    rgb_image[..., 0] = 1.0
    assert overlay(rgb_image, heat, alpha=0.0)[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(ValueError):
        overlay(image, np.zeros((4, 4)))                    # shapes must match: use cam_to_original
    with pytest.raises(ValueError):
        overlay(image, heat, alpha=1.5)


def test_png_bytes_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(rgb))))
    np.testing.assert_array_equal(decoded, rgb)
    gray = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    data = png_bytes(gray)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), np.round(gray * 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------------
# Faithfulness
# --------------------------------------------------------------------------------------------------

def test_removing_the_highlighted_region_hurts_more_than_random():
    toy = ToyModel().eval()
    x = bright_squares([(0, 0), (8, 40), (40, 8), (24, 24), (48, 48)])
    result = grad_cam.grad_cam(toy, x, classes=0)
    batch_sizes = []
    handle = toy.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        scores = faithfulness(toy, x, result.cams, result.class_indices)
    finally:
        handle.remove()
    assert batch_sizes == [15]                              # intact, top-removed, random-removed: one forward
    assert set(scores) == {"prob", "prob_top_removed", "prob_random_removed", "drop_top", "drop_random"}
    assert all(v.shape == (5,) for v in scores.values())
    torch.testing.assert_close(scores["prob"], torch.softmax(result.logits, 1)[:, 0])
    torch.testing.assert_close(scores["drop_top"], scores["prob"] - scores["prob_top_removed"])
    # The bright square alone drives class 0 (p ~ 0.88); removing it brings p to 0.5.
    assert (scores["drop_top"] > 0.3).all()
    assert (scores["drop_top"] >= scores["drop_random"] - 1e-6).all()
    assert float(scores["drop_top"].mean()) > float(scores["drop_random"].mean()) + 0.15


def test_faithfulness_is_seeded_and_masks_have_the_requested_size(model):
    cams = torch.rand(2, S, S, generator=torch.Generator().manual_seed(0))
    top, rand = _removal_masks(cams, 0.2, seed=3)
    expected = round(0.2 * S * S)
    assert top.sum(dim=(1, 2)).tolist() == [expected] * 2 and rand.sum(dim=(1, 2)).tolist() == [expected] * 2
    threshold = cams.flatten(1).kthvalue(S * S - expected, dim=1).values
    assert all(bool((cams[b][top[b]] > threshold[b]).all()) for b in range(2))   # the top pixels
    again = _removal_masks(cams, 0.2, seed=3)[1]
    other = _removal_masks(cams, 0.2, seed=4)[1]
    assert torch.equal(rand, again) and not torch.equal(rand, other)

    x = smooth_images(2, S, seed=12)
    result = grad_cam.grad_cam(model, x)
    first = faithfulness(model, x, result.cams, result.class_indices, seed=1)
    second = faithfulness(model, x, result.cams, result.class_indices, seed=1)
    for key in first:
        assert torch.equal(first[key], second[key])
    torch.testing.assert_close(first["prob"], torch.softmax(result.logits, 1).gather(
        1, result.class_indices[:, None])[:, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        faithfulness(model, x, result.cams[:, :10], result.class_indices)


# --------------------------------------------------------------------------------------------------
# Gallery
# --------------------------------------------------------------------------------------------------

def test_gallery_selection_and_titles():
    from mediscan.evaluation.gallery import select_items, tile_title
    true = [0, 1, 2, 3, 0, 1, 2, 3]
    pred = [0, 1, 2, 3, 1, 0, 2, 3]                  # items 4 and 5 are wrong
    chosen = select_items(true, pred, 4)
    assert chosen == [0, 1, 4, 5]
    assert select_items(true, pred, 3) == [0, 1, 4]  # 3 // 2 = 1 wrong, the rest correct
    assert select_items(true, pred, 16) == list(range(8))
    assert select_items([0, 0], [1, 1], 16) == [0, 1]
    text, colour = tile_title(1, 2, 0.734, ["bone", "brain", "heart", "lungs"])
    assert text == "true: brain / pred: heart (73%)" and colour == "red"
    assert tile_title(3, 3, 0.5, ["bone", "brain", "heart", "lungs"])[1] != "red"


def test_gallery_tiles_follow_the_logits_the_evaluation_counted(model, monkeypatch, tmp_path):
    """An evaluation on a GPU (or in mixed precision) hands its logits to the gallery, which draws on the CPU.
    A borderline item can come out the other way when recomputed there; the gallery must still choose, title
    and explain each tile by the prediction the metrics counted. Here the given logits name, for every sample,
    a class the model itself does not predict, and the samples' truth is that class: every tile is correct,
    and its heatmap is Grad-CAM of that class (reference: grad_cam on the same input and class)."""
    from mediscan.evaluation import gallery
    from mediscan.core.preprocessing import preprocess
    rng = np.random.default_rng(5)
    pixels = [rng.random((48, 48)).astype(np.float32) for _ in range(6)]
    inputs = torch.stack([preprocess(p, S)[0] for p in pixels])
    with torch.no_grad():
        own = model(inputs).argmax(dim=1)
    given = (own + 1) % 4
    logits = torch.nn.functional.one_hot(given, 4).float() * 3.0
    samples = [(p, int(g), f"img{i}.png") for i, (p, g) in enumerate(zip(pixels, given))]
    seen = {}
    monkeypatch.setattr(gallery, "_draw", lambda tiles, tile_logits, cams, classes, path:
                        seen.update(tiles=tiles, logits=tile_logits, cams=cams) or path)
    gallery.save_gradcam_gallery(model, samples, ["a", "b", "c", "d"], tmp_path / "g.png", input_size=S,
                                 logits=logits)
    assert seen["logits"].argmax(dim=1).tolist() == given.tolist()
    reference = grad_cam.grad_cam(model, inputs, classes=given).cams.numpy()
    np.testing.assert_allclose(seen["cams"], reference, atol=1e-5)
    with pytest.raises(ValueError, match="logits must be"):
        gallery.save_gradcam_gallery(model, samples, ["a", "b", "c", "d"], tmp_path / "g.png", input_size=S,
                                     logits=logits[:3])


def test_gallery_writes_png_of_the_documented_size(model, tmp_path):
    from mediscan.evaluation import gallery
    rng = np.random.default_rng(13)
    shapes = [(80, 120), (100, 70), (64, 64), (90, 90), (50, 150)]
    samples = [(rng.random(shape).astype(np.float32), i % 4, f"img{i}.png") for i, shape in enumerate(shapes)]
    classes = ["bone", "brain", "heart", "lungs"]
    path = gallery.save_gradcam_gallery(model, samples, classes, tmp_path / "report" / "gallery.png",
                                        input_size=S, max_items=16)
    assert path.is_file()
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (4 * gallery.TILE_WIDTH_PX, 2 * gallery.TILE_HEIGHT_PX)   # 5 tiles: 4 x 2
    small = gallery.save_gradcam_gallery(model, samples, classes, tmp_path / "two.png", input_size=S, max_items=2)
    with Image.open(small) as png:
        assert png.size == (2 * gallery.TILE_WIDTH_PX, gallery.TILE_HEIGHT_PX)
    assert hook_counts(model) == 0

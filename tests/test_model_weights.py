"""Starting weights: torchxrayvision files, CheXNet checkpoints, offline names, and refusal of unsafe pickles."""
from __future__ import annotations

import pickle
import re

import pytest
import torch
import torch.nn.functional as F

from mediscan.core import model as model_module
from mediscan.core.model import WeightsError, build_model, xrv_weights_path


@pytest.fixture(scope="module")
def xrv_densenet():
    torch.manual_seed(0)
    net = model_module._import_xrv_models().DenseNet(weights=None)
    # Non-trivial BatchNorm statistics, so a mix-up of keys would show.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _features_equal(loaded, reference_state) -> bool:
    got = loaded.features.state_dict()
    return all(torch.equal(got[k], reference_state[k]) for k in got)


def test_xrv_pickled_model_file_loads_without_arbitrary_code(tmp_path, xrv_densenet):
    path = tmp_path / "xrv-densenet.pt"
    torch.save(xrv_densenet, path)          # how torchxrayvision ships its weights: a whole pickled model
    model, source = build_model(4, weights=str(path))
    assert source == "file:xrv-densenet.pt"
    assert _features_equal(model, xrv_densenet.features.state_dict())


def test_xrv_state_dict_file_loads(tmp_path, xrv_densenet):
    path = tmp_path / "state.pt"
    torch.save(xrv_densenet.state_dict(), path)
    model, _ = build_model(3, weights=str(path))
    assert _features_equal(model, xrv_densenet.features.state_dict())
    assert model.head.fc.out_features == 3


def _chexnet_checkpoint(xrv_densenet, conv0_rgb: torch.Tensor) -> dict:
    """An original CheXNet (arnoweng) checkpoint: DataParallel prefixes, old key names, RGB conv0, 14-way head."""
    state = {}
    for key, value in xrv_densenet.features.state_dict().items():
        old = re.sub(r"\.(norm|relu|conv)(\d)\.", r".\1.\2.", f"module.densenet121.features.{key}")
        state[old] = value.clone()
    state["module.densenet121.features.conv0.weight"] = conv0_rgb
    state["module.densenet121.classifier.0.weight"] = torch.randn(14, 1024)
    state["module.densenet121.classifier.0.bias"] = torch.zeros(14)
    return {"epoch": 7, "arch": "densenet121", "state_dict": state, "best_loss": 0.12, "optimizer": {}}


def test_chexnet_checkpoint_loads_and_folds_imagenet_normalisation(tmp_path, xrv_densenet):
    torch.manual_seed(1)
    conv0_rgb = torch.randn(64, 3, 7, 7) * 0.05
    path = tmp_path / "model.pth.tar"
    torch.save(_chexnet_checkpoint(xrv_densenet, conv0_rgb), path)
    model, source = build_model(4, weights=str(path))
    model.eval()
    assert source == "file:model.pth.tar"
    state = xrv_densenet.features.state_dict()
    assert torch.equal(model.features.state_dict()["denseblock3.denselayer5.norm2.weight"],
                       state["denseblock3.denselayer5.norm2.weight"])

    # What CheXNet computed on an ImageNet-normalised RGB image must equal what the folded layer
    # computes on the same grey image in our [-1024, 1024] range (away from the zero-padded border).
    grey01 = torch.rand(1, 1, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    chexnet_in = (grey01.expand(1, 3, 32, 32) - mean) / std
    norm0 = xrv_densenet.features.norm0
    reference = F.batch_norm(F.conv2d(chexnet_in, conv0_rgb, stride=2, padding=3), norm0.running_mean,
                             norm0.running_var, norm0.weight, norm0.bias, False, 0.0, norm0.eps)
    ours_in = (grey01 * 2 - 1) * 1024
    with torch.no_grad():
        ours = model.features.norm0(model.features.conv0(ours_in))
    interior = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert torch.allclose(ours[interior], reference[interior], atol=1e-3, rtol=1e-4)


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/mediscan-pwned",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = "/tmp/mediscan-pwned"
    import os
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _Exploit()}, handle)
    with pytest.raises(WeightsError, match="refused|not a weights file"):
        build_model(4, weights=str(path))
    assert not os.path.exists(marker)


def test_file_without_densenet_weights_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"linear.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(WeightsError, match="no DenseNet 'features"):
        build_model(4, weights=str(path))


def test_unknown_weights_name_lists_choices():
    with pytest.raises(WeightsError, match="densenet121-res224-chex"):
        build_model(4, weights="densenet999-imaginary")


def test_offline_named_weights_say_which_file_where_and_alternative(tmp_path, monkeypatch):
    def no_network(url, filename):
        raise ConnectionError("network is unreachable")
    monkeypatch.setattr(model_module._import_xrv_models().utils, "download", no_network)
    with pytest.raises(WeightsError) as err:
        build_model(4, weights="densenet121-res224-chex", cache_dir=tmp_path / "cache")
    message = str(err.value)
    expected = xrv_weights_path("densenet121-res224-chex", tmp_path / "cache")
    assert str(expected) in message and "--weights none" in message
    assert not list((tmp_path / "cache").glob("*.partial"))


def test_cached_named_weights_load_without_network(tmp_path, monkeypatch, xrv_densenet):
    def no_network(url, filename):
        raise AssertionError("must not download when the file is cached")
    monkeypatch.setattr(model_module._import_xrv_models().utils, "download", no_network)
    cached = xrv_weights_path("densenet121-res224-nih", tmp_path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(xrv_densenet, cached)
    model, source = build_model(4, weights="densenet121-res224-nih", cache_dir=tmp_path)
    assert source == "torchxrayvision:densenet121-res224-nih"
    assert _features_equal(model, xrv_densenet.features.state_dict())


def test_backbone_relus_are_not_inplace():
    model, _ = build_model(2, weights="none")
    assert all(not m.inplace for m in model.modules() if isinstance(m, torch.nn.ReLU))

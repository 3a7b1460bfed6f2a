"""flexquant's own torchvision-compatible classifiers: layout, parameter counts, model resolution, splitting."""

from __future__ import annotations

import copy
import hashlib
import logging
import sys
import types

import pytest
import torch

from flexquant.vision import VisionError, build_model, load_weights
from flexquant.vision.graph import fold_batchnorm, split_model
from flexquant.vision.zoo import ZOO

# torchvision's documented parameter counts (num_params, 1000 classes)
TORCHVISION_NUM_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
    "mobilenet_v2": 3_504_872,
    "regnet_x_400mf": 5_495_976,
    "regnet_x_800mf": 7_259_656,
    "regnet_x_1_6gf": 9_190_136,
    "regnet_x_3_2gf": 15_296_552,
    "regnet_y_400mf": 4_344_144,
    "regnet_y_800mf": 6_432_512,
    "regnet_y_1_6gf": 11_202_430,
    "regnet_y_3_2gf": 19_436_338,
}

# (number of state-dict entries, sha256[:16] of its "name:shape" lines in order), taken from torchvision 0.28
TORCHVISION_STATE_DICT = {
    "resnet18": (122, "3e58b0798c806a0c"),
    "resnet50": (320, "781bb16f43b8f96f"),
    "mobilenet_v2": (314, "2a375ead3e9604e1"),
    "regnet_x_400mf": (428, "c5218b26738897ed"),
}

# a few exact entries of torchvision's state dicts (1000 classes)
TORCHVISION_KEYS = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.num_batches_tracked": (),
        "layer4.1.bn2.bias": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    },
    "resnet50": {
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer3.5.bn3.running_mean": (1024,),
        "layer4.0.conv2.weight": (512, 512, 3, 3),
        "fc.weight": (1000, 2048),
    },
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.running_mean": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.bias": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.17.conv.3.running_var": (320,),
        "features.18.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280),
    },
    "regnet_x_400mf": {
        "stem.0.weight": (32, 3, 3, 3),
        "trunk_output.block1.block1-0.proj.0.weight": (32, 32, 1, 1),
        "trunk_output.block1.block1-0.f.a.0.weight": (32, 32, 1, 1),
        "trunk_output.block1.block1-0.f.b.0.weight": (32, 16, 3, 3),
        "trunk_output.block2.block2-1.f.c.1.running_var": (64,),
        "trunk_output.block4.block4-11.f.c.0.weight": (400, 400, 1, 1),
        "fc.weight": (1000, 400),
    },
    "regnet_y_400mf": {
        "trunk_output.block1.block1-0.f.se.fc1.weight": (8, 48, 1, 1),
        "trunk_output.block1.block1-0.f.se.fc2.bias": (48,),
        "fc.weight": (1000, 440),
    },
}


def _meta_model(name: str, num_classes: int = 1000) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return ZOO[name](num_classes=num_classes)


def test_every_definition_has_torchvisions_parameter_count():
    assert set(ZOO) == set(TORCHVISION_NUM_PARAMS)
    counts = {name: sum(p.numel() for p in _meta_model(name).parameters()) for name in ZOO}
    assert counts == TORCHVISION_NUM_PARAMS


@pytest.mark.parametrize("name", sorted(TORCHVISION_KEYS))
def test_state_dict_names_and_shapes_are_torchvisions(name):
    state = _meta_model(name).state_dict()
    assert {k: tuple(state[k].shape) for k in TORCHVISION_KEYS[name]} == TORCHVISION_KEYS[name]
    if name in TORCHVISION_STATE_DICT:
        text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
        assert (len(state), hashlib.sha256(text.encode()).hexdigest()[:16]) == TORCHVISION_STATE_DICT[name]


def test_safetensors_weights_load_strictly(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = build_model("resnet18", 4).eval()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    dst = build_model("resnet18", 4).eval()
    load_weights(dst, str(tmp_path / "r18.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    with pytest.raises(VisionError, match=r"does not fit the model: .*wrong shape \['fc.bias', 'fc.weight'\]"):
        load_weights(build_model("resnet18", 5), str(tmp_path / "r18.safetensors"))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "regnet_x_400mf", "regnet_y_400mf"])
def test_fold_and_split_keep_the_function(name):
    torch.manual_seed(0)
    model = ZOO[name](num_classes=4).double().train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding is really exercised
        model(torch.randn(4, 3, 32, 32, dtype=torch.float64) * 2 + 0.5)
    model.eval()
    folded = fold_batchnorm(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    seq = split_model(folded, probe=x, reference=model)
    blocks = {"resnet18": 8, "resnet50": 16, "mobilenet_v2": 18, "regnet_x_400mf": 22, "regnet_y_400mf": 16}[name]
    assert seq.names[0] == "stem" and seq.names[-1] == "head" and len(seq.names) == blocks + 2
    with torch.no_grad():
        assert torch.allclose(seq(x), model(x), atol=1e-10, rtol=1e-10)


def _fake_torchvision(builder):
    """A stand-in torchvision module whose model registry answers with `builder`."""

    def get_model_builder(name):
        if builder is None:
            raise ValueError(f"Unknown model {name}")
        return builder

    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.0-fake"
    tv.models = types.SimpleNamespace(get_model_builder=get_model_builder)
    return tv


class _Marker(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(2, num_classes)


def test_torchvision_is_used_when_it_works(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="flexquant.vision.models")
    fake = _fake_torchvision(lambda weights, num_classes: _Marker(num_classes))
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    model = build_model("resnet18", 3)
    assert isinstance(model, _Marker) and model._flexquant_arch["name"] == "resnet18"
    assert "building resnet18 with torchvision 0.0-fake" in caplog.text


@pytest.mark.parametrize("builder", [None, "raises"])
def test_own_definition_when_torchvision_cannot_build_it(monkeypatch, caplog, builder):
    def broken(weights, num_classes):
        raise RuntimeError("operator torchvision::nms does not exist")

    caplog.set_level(logging.INFO, logger="flexquant.vision.models")
    monkeypatch.setitem(sys.modules, "torchvision", _fake_torchvision(broken if builder else None))
    model = build_model("mobilenet_v2", 3)
    assert type(model).__module__ == "flexquant.vision.zoo.mobilenetv2"
    assert "using flexquant's own definition" in caplog.text
    if builder:  # a model we have no definition of cannot fall back
        with pytest.raises(VisionError, match="torchvision failed to build regnet_y_8gf: RuntimeError"):
            build_model("regnet_y_8gf", 3)
    else:
        with pytest.raises(VisionError, match="torchvision has no model named 'regnet_y_8gf'"):
            build_model("regnet_y_8gf", 3)


def test_own_definition_when_torchvision_is_missing(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="flexquant.vision.models")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    model = build_model("regnet_x_400mf", 3)
    assert type(model).__module__ == "flexquant.vision.zoo.regnet" and model.fc.out_features == 3
    assert "torchvision unavailable (ModuleNotFoundError" in caplog.text
    assert "building regnet_x_400mf from flexquant's own definition" in caplog.text

"""Config validation, checkpoints, image folders and the CLI (tiny models, generated images, no downloads)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flexquant.cli.vision import main
from flexquant.vision import (
    VisionError,
    VisionQuantConfig,
    load_image_folder,
    load_quantized,
    quantize_classifier,
    save_quantized,
)
from flexquant.vision.data import iter_image_folder

TINY = VisionQuantConfig(w_bits=3, a_bits=4, iters=3)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"w_bits": 1}, "w_bits=1 must be an integer from 2 to 8"),
        ({"a_bits": 9}, "a_bits=9 must be an integer from 2 to 8"),
        ({"w_bits": 4.0}, "w_bits=4.0 must be an integer"),
        ({"a_bits": True}, "a_bits=True must be an integer"),
        ({"iters": -1}, "iters=-1 must be an integer >= 0"),
        ({"qdrop_prob": 1.0}, r"qdrop_prob=1.0 must be in \[0, 1\)"),
        ({"lr_round": 0}, "lr_round=0 must be a positive finite number"),
        ({"temperature": float("nan")}, "temperature=nan must be a positive"),
        ({"meta": "yes"}, "meta='yes' must be True or False"),
        ({"calib_size": 0}, "calib_size=0 must be a positive integer or None"),
        ({"seed": -3}, "seed=-3 must be an integer >= 0"),
    ],
)
def test_bad_config_raises_a_clear_error(fields, message):
    with pytest.raises(VisionError, match=message):
        VisionQuantConfig(**fields)


def test_config_json_round_trip_and_unknown_fields():
    cfg = VisionQuantConfig(w_bits=2, meta=True, margin=0.2)
    assert VisionQuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(VisionError, match=r"unknown config field\(s\) \['wbits'\]"):
        VisionQuantConfig.from_dict({"wbits": 4})
    with pytest.raises(VisionError, match="format_version 99"):
        VisionQuantConfig.from_dict({"format_version": 99})


def test_save_load_round_trip_gives_identical_logits(tmp_path, images, make_model):
    q = quantize_classifier(make_model(), images, TINY, progress=False)
    out = save_quantized(q, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "quant_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder is left behind"
    loaded = load_quantized(out)  # built by name: the file says how to rebuild the skeleton
    assert torch.equal(loaded(images), q(images))
    assert loaded.settings == q.settings and loaded.config == q.config
    meta = json.loads((out / "quant_config.json").read_text())
    # 3-bit codes + per-channel scale/zero, 8-bit first/last layers; the file keeps one byte per code
    assert meta["storage"]["bpw_packed"] < 3.6 < 8 < meta["storage"]["bpw_in_file"]
    # overwriting an existing checkpoint is atomic and allowed
    save_quantized(q, out)
    assert torch.equal(load_quantized(out)(images), q(images))


def test_checkpoint_of_an_unnamed_model_needs_its_skeleton(tmp_path, images):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(1),
        torch.nn.Linear(8, 4),
    ).eval()
    q = quantize_classifier(model, images, TINY, progress=False)
    save_quantized(q, tmp_path / "seq")
    with pytest.raises(VisionError, match="pass its architecture"):
        load_quantized(tmp_path / "seq")
    assert torch.equal(load_quantized(tmp_path / "seq", model=model)(images), q(images))


def test_bad_checkpoints_are_refused(tmp_path, images, make_model):
    q = quantize_classifier(make_model(), images, TINY, progress=False)
    out = save_quantized(q, tmp_path / "ckpt")
    with pytest.raises(VisionError, match="not a quantized classifier checkpoint"):
        load_quantized(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(VisionError, match="is not a flexquant vision checkpoint"):
        save_quantized(q, tmp_path / "other")
    (tmp_path / "llm").mkdir()  # an LLM checkpoint uses the same JSON file name; it is not ours to replace
    (tmp_path / "llm" / "quant_config.json").write_text('{"method": "gptq"}')
    with pytest.raises(VisionError, match="is not a flexquant vision checkpoint"):
        save_quantized(q, tmp_path / "llm")
    meta = json.loads((out / "quant_config.json").read_text())
    (out / "quant_config.json").write_text(json.dumps({**meta, "format_version": 7}))
    with pytest.raises(VisionError, match="format_version 7"):
        load_quantized(out)
    (out / "quant_config.json").write_text(json.dumps(meta))
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(VisionError, match="corrupted"):
        load_quantized(out)
    with pytest.raises(VisionError, match="does not match the architecture"):
        save_quantized(q, out)
        load_quantized(out, model=make_model("tiny_mobilenet_v2"))


def make_image_folder(root, classes=("cat", "dog", "owl"), per_class=3, size=(14, 18)):
    """A tiny ImageFolder of random PNGs (and one .npy) with a class-dependent brightness."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 60 * c, 30, (*size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    np.save(root / classes[0] / "extra.npy", rng.random((3, *size)).astype(np.float32))
    return root


def test_image_folder_reads_pictures_and_arrays(tmp_path):
    pytest.importorskip("PIL")
    X, y, classes = load_image_folder(make_image_folder(tmp_path / "imgs"), image_size=8)
    assert X.shape == (10, 3, 8, 8) and classes == ["cat", "dog", "owl"]
    assert y.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    batches = list(iter_image_folder(tmp_path / "imgs", image_size=8, batch_size=4))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), X) and torch.equal(torch.cat([b[1] for b in batches]), y)
    with pytest.raises(VisionError, match="no images found"):
        (tmp_path / "empty" / "a").mkdir(parents=True)
        load_image_folder(tmp_path / "empty", 8)


def test_cli_quantize_end_to_end_with_a_builtin_model(tmp_path, capsys):
    pytest.importorskip("PIL")
    data = make_image_folder(tmp_path / "train")
    val = make_image_folder(tmp_path / "val")
    out = tmp_path / "out"
    flags = "--image-size 12 --w-bits 4 --a-bits 4 --iters 3 --meta --meta-steps 1".split()
    rc = main(["quantize", "--model", "tiny_resnet", "--data", str(data), "--val", str(val), "--out", str(out), *flags])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= report["quant_top1"] <= 1 and report["out"] == str(out)
    loaded = load_quantized(out)
    assert loaded.config.meta and loaded.metrics["quant_top1"] == report["quant_top1"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "vgg16"], "unknown model 'vgg16'"),
        (["--model", "tiny_resnet", "--w-bits", "1"], "w_bits=1 must be an integer from 2 to 8"),
        (["--model", "tiny_resnet", "--weights", "/nonexistent.safetensors"], "weights file not found"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    pytest.importorskip("PIL")
    data = make_image_folder(tmp_path / "train")
    rc = main(["quantize", "--data", str(data), "--out", str(tmp_path / "o"), "--iters", "1", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_missing_data_folder(tmp_path, capsys):
    rc = main(["quantize", "--model", "tiny_resnet", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "image folder not found" in capsys.readouterr().err


def test_cli_resnet18_end_to_end(tmp_path, capsys, monkeypatch):
    # torchvision's ResNet-18 when torchvision works, else flexquant's own definition (same module names)
    pytest.importorskip("PIL")
    from flexquant.vision import checkpoint

    saved = {}
    real_save = checkpoint.save_quantized

    def keep(model, path):
        saved["model"] = model
        return real_save(model, path)

    monkeypatch.setattr(checkpoint, "save_quantized", keep)
    data = make_image_folder(tmp_path / "train", per_class=2, size=(40, 36))
    out = tmp_path / "r18"
    flags = "--image-size 32 --w-bits 4 --a-bits 4 --iters 2 --meta --meta-steps 1".split()
    rc = main(["quantize", "--model", "resnet18", "--data", str(data), "--val", str(data), "--out", str(out), *flags])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert 0 <= report["fp_top1"] <= 1 and 0 <= report["quant_top1"] <= 1 and report["weights"] == 11_168_448
    loaded = load_quantized(out)
    X, y, _ = load_image_folder(data, 32)
    logits = loaded(X)
    assert logits.shape == (len(X), 3) and torch.isfinite(logits).all()
    assert torch.equal(logits, saved["model"](X)), "the checkpoint reloads to the very same logits"
    assert (logits.argmax(-1) == y).double().mean().item() == pytest.approx(report["quant_top1"])
    assert loaded.seq.names == ["stem", *(f"layer{i}.{j}" for i in range(1, 5) for j in range(2)), "head"]
    assert loaded.arch == {"name": "resnet18", "num_classes": 3, "in_channels": 3}


def test_torchvision_names_fall_back_or_fail_clearly_without_torchvision(monkeypatch):
    import builtins

    from flexquant.vision import build_model

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    assert type(build_model("resnet18", 10)).__module__ == "flexquant.vision.zoo.resnet"
    with pytest.raises(VisionError, match=r"torchvision is needed .*RuntimeError: operator torchvision::nms"):
        build_model("regnet_y_128gf", 10)  # no definition of our own

"""`flexquant report DIR`: a readable page with the run's figures, plots and per-layer table."""

import json

import pytest
import torch

import flexquant as fq
from flexquant.cli import main
from flexquant.report_page import transform_choices, write_report_page


@pytest.fixture(scope="module")
def flex_ckpt(tmp_path_factory):
    calib = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(3))
    qm = fq.quantize("tiny-llama", method="flexible", group_size=32, calib_ids=calib, batch_size=4, progress=False,
                     options={"bpw": 3.0, "dosa": True, "alloc_nsamples": 4, "lfd": False})
    return qm, fq.save(qm, tmp_path_factory.mktemp("rep") / "q", plot=False)


def test_markdown_page_has_figures_plots_transforms_and_layers(flex_ckpt, capsys):
    qm, path = flex_ckpt
    assert main(["report", str(path), "-q"]) == 0
    out = path / json.loads(capsys.readouterr().out)["report"]
    text = out.read_text()
    report = json.loads((path / "report.json").read_text())
    assert f"{report['summary']['bpw']:.4g}" in text  # the run's stored bpw
    assert "## Bits and error per layer" in text and "## FlexibleLLM" in text and "## Transforms" in text
    for img in ("report_layers.png", "report_flexible.png", "report_transforms.png"):
        assert f"]({img})" in text and (path / img).stat().st_size > 1000
    assert "residual stream" in text and "model.layers.1.mlp.down_proj | online Hadamard" in text
    assert text.split("## Layers")[1].count("| model.layers.") == 14  # one row per quantized linear
    choices = transform_choices(report)
    assert choices["model.layers.0.mlp.down_proj"].startswith("online Hadamard")


def test_html_page_is_self_contained(flex_ckpt, tmp_path):
    _, path = flex_ckpt
    out = write_report_page(path, tmp_path / "page.html", html_page=True)
    text = out.read_text()
    assert text.startswith("<!doctype html>") and text.count("data:image/png;base64,") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]  # no stray PNGs or temp files


def test_page_for_a_checkpoint_without_run_report(tmp_path):
    qm = fq.quantize("tiny-llama", method="rtn", bits=3, group_size=32, progress=False)
    qm.report = {}
    path = fq.save(qm, tmp_path / "q", plot=False)  # no report.json
    text = write_report_page(path).read_text()
    assert "tiny-llama · rtn" in text and "| model.layers.0.self_attn.q_proj | 128×128 | 3 |" in text


def test_bad_inputs(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "-q"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "-q"]) == 2
    assert "not a flexquant checkpoint" in capsys.readouterr().err

import json
import subprocess
import sys

import pytest

from flexquant.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "q"
    rc = main(["quantize", "tiny-llama", "--method", "gptq", "--bits", "4", "--group-size", "32",
               "--nsamples", "4", "--seqlen", "64", "--out", str(out), "-q"])
    assert rc == 0
    return out


def test_quantize_writes_checkpoint_and_report(ckpt):
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "quant_config.json", "report.json", "config.json", "report.png"} <= names
    report = json.loads((ckpt / "report.json").read_text())
    assert report["config"]["grid"]["bits"] == 4 and len(report["layers"]) == 14


def test_eval_json(ckpt, capsys):
    assert main(["eval", str(ckpt), "--seqlen", "128", "--windows", "2", "--reference", "tiny-llama",
                 "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"perplexity", "kl_divergence", "bpw", "windows"} <= set(res)
    assert res["windows"] == 2 and 4 < res["bpw"] < 5.5 and res["kl_divergence"] >= 0


def test_info_and_generate(ckpt, capsys):
    assert main(["info", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "gptq" and len(info["modules"]) == 14
    assert main(["generate", str(ckpt), "--prompt", "import os", "--max-new-tokens", "4", "-q"]) == 0


@pytest.mark.parametrize("argv,msg", [
    (["quantize", "tiny-llama", "--group-size", "48", "--out", "OUT"], "does not divide"),
    (["quantize", "unknown-model", "--out", "OUT"], "not a built-in name"),
    (["quantize", "tiny-llama", "--calib", "NOFILE", "--out", "OUT"], "neither"),
    (["eval", "NOCKPT_DIR_THAT_IS_MISSING"], "not a built-in name"),
    (["info", "."], "quant_config.json is missing"),
])
def test_user_errors_are_one_line_exit_2(argv, msg, tmp_path, capsys):
    argv = [str(tmp_path / "o") if a == "OUT" else str(tmp_path / "none.txt") if a == "NOFILE" else a
            for a in argv]
    assert main(argv + ["-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o").exists()


def test_bits_out_of_range_is_rejected_by_the_parser():
    proc = subprocess.run([sys.executable, "-m", "flexquant.cli", "quantize", "tiny-llama", "--bits", "5",
                           "--out", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr

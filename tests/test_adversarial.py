"""A hostile user on tiny-llama: bad arguments, unusable output folders, text that is not text, model folders
with missing or extra weights, and checkpoints tampered with (with and without recomputed checksums).

Every case asserts the exit status (2 for a user error, 1 for an unexpected one), a single `flexquant: error:`
line on stderr without a traceback, and that nothing was left behind; every tampering is refused.
(Interop folders: test_adversarial_interop.py; killed saves: test_adversarial_crash.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import flexquant as fq
from flexquant.cli import main
from flexquant.errors import CheckpointError, FlexQuantError

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def one_line_error(err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("flexquant:")]
    assert len(lines) == 1 and lines[0].startswith("flexquant: error:"), err
    assert "Traceback" not in err, err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----- arguments: refused before any work -----
BAD_ARGS = [
    (("eval", "x", "--windows", "0"), "--windows"),
    (("eval", "x", "--windows", "-3"), "--windows"),
    (("eval", "x", "--windows", "many"), "--windows"),
    (("eval", "x", "--seqlen", "0"), "--seqlen"),
    (("eval", "x", "--seqlen", "1"), "--seqlen"),
    (("eval", "x", "--lm-batch-size", "0"), "--lm-batch-size"),
    (("generate", "x", "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens"),
    (("generate", "x", "--prompt", "hi", "--max-new-tokens", "-1"), "--max-new-tokens"),
    (("generate", "x", "--prompt", ""), "--prompt"),
    (("generate", "x", "--prompt", "   "), "--prompt"),
    (("quantize", "tiny-llama", "--out", "OUT", "--eval-windows", "-1"), "--eval-windows"),
    (("quantize", "tiny-llama", "--out", "OUT", "--nsamples", "0"), "nsamples"),
    (("quantize", "tiny-llama", "--out", "OUT", "--seqlen", "0"), "seqlen"),
    (("quantize", "tiny-llama", "--out", "OUT", "--bits", "0"), "bits"),
    (("quantize", "tiny-llama", "--out", "OUT", "--bits", "9"), "bits"),
    (("quantize", "tiny-llama", "--out", "OUT", "--group-size", "0"), "group"),
    (("quantize", "tiny-llama", "--out", "OUT", "--batch-size", "0"), "batch"),
    (("quantize", "tiny-llama", "--out", "OUT", "--damp", "2"), "damp"),
    (("quantize", "tiny-llama", "--out", "OUT", "--method", "nope"), "nope"),
    (("quantize", "tiny-llama", "--out", "OUT", "--max-memory", "lots"), "lots"),
    (("quantize", "tiny-llama", "--out", "OUT", "--store-dtype", "int8"), "int8"),
    (("quantize", "tiny-llama", "--out", "OUT", "--no-such-flag"), "no-such-flag"),
    (("quantize", "tiny-llama"), "--out"),
    (("quantize", "tiny-llama", "--out", "OUT", "--bpw", "3"), "--bpw"),
    (("nope",), "nope"),
]


@pytest.mark.parametrize("argv,word", BAD_ARGS, ids=[" ".join(a[0][:1] + a[0][2:])[:40] for a in BAD_ARGS])
def test_bad_arguments_are_one_line_errors(argv, word, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:  # argparse exits; config errors return 2
        raise SystemExit(main(list(argv)))
    assert e.value.code == 2
    one_line_error(capsys.readouterr().err, word)
    assert not list(tmp_path.iterdir())  # nothing written


# ----- output folders: refused before the model is loaded -----
def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc, err = run(capsys, "quantize", "tiny-llama", "--method", "rtn", "--out", str(tmp_path / "f"), "--overwrite")
    assert rc == 2
    one_line_error(err, "is a file")
    assert (tmp_path / "f").read_text() == "x"


def test_out_below_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc, err = run(capsys, "quantize", "tiny-llama", "--method", "rtn", "--out", str(tmp_path / "f" / "sub"))
    assert rc == 2
    one_line_error(err, "cannot create")


def test_out_that_is_not_a_checkpoint_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    rc, err = run(capsys, "quantize", "tiny-llama", "--method", "rtn", "--out", str(tmp_path / "mine"), "--overwrite")
    assert rc == 2
    one_line_error(err, "not a flexquant checkpoint")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"


def test_existing_out_without_overwrite(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    rc, err = run(capsys, "quantize", "tiny-llama", "--method", "rtn", "--out", str(tmp_path / "o"))
    assert rc == 2
    one_line_error(err, "--overwrite")


# ----- text -----
def test_binary_calibration_text(tmp_path, capsys):
    (tmp_path / "calib.bin").write_bytes(bytes(range(256)) * 64)
    rc, err = run(capsys, "quantize", "tiny-llama", "--method", "gptq", "--calib", str(tmp_path / "calib.bin"),
                  "--out", str(tmp_path / "o"), "-q")
    assert rc == 2
    one_line_error(err, "not utf-8 text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.bin"]


def test_mostly_undecodable_text(tmp_path):
    from flexquant.data.text import load_text

    (tmp_path / "t.txt").write_bytes(b"\xff\xfe" * 500 + b"some words")
    with pytest.raises(FlexQuantError, match="not UTF-8 text"):
        load_text(str(tmp_path / "t.txt"), "calib")


def test_text_with_a_few_bad_bytes_is_read(tmp_path):
    from flexquant.data.text import load_text

    (tmp_path / "t.txt").write_bytes(("word " * 2000).encode() + b"\xff")
    assert load_text(str(tmp_path / "t.txt"), "calib").startswith("word")


def test_seqlen_beyond_the_context(tmp_path, capsys):
    rc, err = run(capsys, "quantize", "tiny-llama", "--method", "gptq", "--seqlen", "5000", "--out",
                  str(tmp_path / "o"), "-q")
    assert rc == 2
    one_line_error(err, "context of 4096")
    assert not list(tmp_path.iterdir())


# ----- plain model folders -----


def _edited_weights(fp_folder, tmp_path, edit) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(fp_folder, folder)
    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


WEIGHT_EDITS = {
    "missing": (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "lack"),
    "unexpected": (lambda sd: sd.update({"model.layers.1.extra.weight": torch.zeros(3)}), "unexpected"),
    "wrong-shape": (lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4)}), "shape"),
}


@pytest.mark.parametrize("stream", ["on", "off"])
@pytest.mark.parametrize("edit", sorted(WEIGHT_EDITS))
def test_model_folder_with_wrong_weights_is_refused(fp_folder, tmp_path, capsys, edit, stream):
    fn, word = WEIGHT_EDITS[edit]
    folder = _edited_weights(fp_folder, tmp_path, fn)
    rc, err = run(capsys, "quantize", str(folder), "--method", "rtn", "--stream", stream, "--out",
                  str(tmp_path / "o"), "-q")
    assert rc == 2
    one_line_error(err, word)
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_overflowing_weights_are_a_clear_error(fp_folder, tmp_path, capsys):
    folder = _edited_weights(fp_folder, tmp_path,
                             lambda sd: sd["model.layers.0.self_attn.o_proj.weight"].fill_(3e38))
    rc, err = run(capsys, "quantize", str(folder), "--method", "rtn", "--out", str(tmp_path / "o"), "-q")
    assert rc == 2
    one_line_error(err, "non-finite")
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path)


# ----- checkpoints tampered with -----
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    qm = fq.quantize("tiny-llama", method="gptq", bits=3, group_size=32, calib_ids=CALIB, progress=False)
    return fq.save(qm, tmp_path_factory.mktemp("adv_ckpt") / "q", plot=False)


def _copy(ckpt, tmp_path) -> Path:
    folder = tmp_path / "q"
    shutil.copytree(ckpt, folder)
    return folder


def _edit_json(folder: Path, name: str, fn) -> None:
    data = json.loads((folder / name).read_text())
    fn(data)
    (folder / name).write_text(json.dumps(data, indent=2))


def _first_module(qc) -> dict:
    return qc["modules"][sorted(qc["modules"])[0]]


def _reseal(folder: Path) -> None:
    """What an attacker who knows the format does: recompute every checksum after the edit."""
    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    qc = json.loads((folder / "quant_config.json").read_text())
    qc["checksums"] = {n: sha(folder / n) for n in qc["checksums"] if (folder / n).is_file()}
    (folder / "quant_config.json").write_text(json.dumps(qc, indent=2))
    man = json.loads((folder / "manifest.json").read_text())
    man["files"] = {n: sha(folder / n) for n in man["files"] if (folder / n).is_file()}
    (folder / "manifest.json").write_text(json.dumps(man, indent=2))


def _shard(folder: Path) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[0]


def _edit_shard(folder: Path, fn) -> None:
    f = _shard(folder)
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt", "flexquant": "4"})


TAMPER = {  # name -> (edit, words the refusal names)
    "flip sym": (lambda f: _edit_json(f, "quant_config.json", lambda q: _first_module(q).update(
        sym=not _first_module(q)["sym"])), "checksum"),
    "bits 8": (lambda f: _edit_json(f, "quant_config.json", lambda q: _first_module(q).update(bits=[8])), "checksum"),
    "group size": (lambda f: _edit_json(f, "quant_config.json", lambda q: _first_module(q).update(group_size=64)),
                   "checksum"),
    "rope_theta": (lambda f: _edit_json(f, "config.json", lambda c: c.update(rope_theta=500.0)), "checksum"),
    "rms_norm_eps": (lambda f: _edit_json(f, "config.json", lambda c: c.update(rms_norm_eps=0.5)), "checksum"),
    "layers": (lambda f: _edit_json(f, "config.json", lambda c: c.update(num_hidden_layers=3)), "checksum"),
    "dtype": (lambda f: _edit_json(f, "config.json", lambda c: c.update(torch_dtype="float16")), "checksum"),
    "generation config": (lambda f: _edit_json(f, "generation_config.json", lambda c: c.update(temperature=9.0)),
                          "checksum"),
    "tokenizer": (lambda f: (f / "tokenizer.json").write_text((f / "tokenizer.json").read_text()[:-2] + " }"),
                  "checksum"),
    "byte flip": (lambda f: _flip(_shard(f)), "checksum"),
    "truncated shard": (lambda f: _shard(f).write_bytes(_shard(f).read_bytes()[:-100]), "checksum"),
    "deleted shard": (lambda f: _shard(f).unlink(), "missing"),
    "deleted manifest": (lambda f: (f / "manifest.json").unlink(), "manifest"),
    "garbage manifest": (lambda f: (f / "manifest.json").write_text("{not json"), "manifest"),
    "added file": (lambda f: (f / "special_tokens_map.json").write_text("{}"), "does not list"),
    "added shard": (lambda f: shutil.copy(_shard(f), f / "model-99999-of-99999.safetensors"), "does not list"),
    "deleted config": (lambda f: (f / "config.json").unlink(), "missing"),
    "garbage quant_config": (lambda f: (f / "quant_config.json").write_text("[1, 2"), "not valid json"),
    # resealed: every checksum recomputed, so only the cross-checks can refuse
    "resealed bits 8": (lambda f: (_edit_json(f, "quant_config.json", lambda q: _first_module(q).update(bits=[8])),
                                   _reseal(f)), "bits"),
    "resealed group size": (lambda f: (_edit_json(f, "quant_config.json",
                                                  lambda q: _first_module(q).update(group_size=64)), _reseal(f)),
                            "group"),
    "resealed in_features": (lambda f: (_edit_json(f, "quant_config.json",
                                                   lambda q: _first_module(q).update(in_features=64)), _reseal(f)),
                             "in_features"),
    "resealed sym": (lambda f: (_edit_json(f, "quant_config.json", lambda q: _first_module(q).update(sym=True)),
                                _reseal(f)), "zero points"),
    "resealed bpw": (lambda f: (_edit_json(f, "quant_config.json", lambda q: _first_module(q).update(bpw=2.0)),
                                _reseal(f)), "bits per weight"),
    "resealed dtype": (lambda f: (_edit_json(f, "quant_config.json", lambda q: q.update(torch_dtype="load")),
                                  _reseal(f)), "torch_dtype"),
    "resealed layers": (lambda f: (_edit_json(f, "config.json", lambda c: c.update(num_hidden_layers=1)),
                                   _reseal(f)), "does not have"),
    "resealed hidden": (lambda f: (_edit_json(f, "config.json", lambda c: c.update(hidden_size=64)),
                                   _reseal(f)), "another layer"),
    "resealed heads": (lambda f: (_edit_json(f, "config.json", lambda c: c.update(num_attention_heads=3)),
                                  _reseal(f)), "config.json"),
    "resealed traversal": (lambda f: (_edit_json(f, "quant_config.json", lambda q: q["checksums"].update(
        {"../../x.safetensors": "0"})), _reseal_manifest_only(f)), "checksums"),
    "resealed nan scale": (lambda f: (_edit_shard(f, _nan_scale), _reseal(f)), "nan"),
    "resealed bit map": (lambda f: (_edit_shard(f, _bad_bit_map), _reseal(f)), "bit"),
    "resealed dtype deleted": (lambda f: (_edit_json(f, "quant_config.json", lambda q: q.pop("torch_dtype")),
                                          _reseal(f)), "torch_dtype"),
    "resealed config dtype int8": (lambda f: (_edit_json(f, "config.json", lambda c: c.update(dtype="int8")),
                                              _reseal(f)), "dtype"),
    "resealed huge norm": (lambda f: (_edit_shard(f, lambda sd: _norm(sd, lambda t: t * 1e20)), _reseal(f)),
                           "beyond"),
    "resealed bfloat16 norm": (lambda f: (_edit_shard(f, lambda sd: _norm(sd, lambda t: t.bfloat16())),
                                          _reseal(f)), "bfloat16"),
    "resealed dropped module record": (lambda f: (_edit_json(f, "quant_config.json", lambda q: q["modules"].pop(
        sorted(q["modules"])[0])), _reseal(f)), "unexpected"),
}


def _flip(f: Path) -> None:
    b = bytearray(f.read_bytes())
    b[-10] ^= 0xFF
    f.write_bytes(bytes(b))


def _reseal_manifest_only(folder: Path) -> None:
    man = json.loads((folder / "manifest.json").read_text())
    man["files"]["quant_config.json"] = hashlib.sha256((folder / "quant_config.json").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(man))


def _nan_scale(sd) -> None:
    k = next(k for k in sorted(sd) if k.endswith(".scales") or k.endswith(".scale_base"))
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = float("nan")


def _norm(sd, fn) -> None:
    k = next(k for k in sorted(sd) if k.endswith("layernorm.weight"))
    sd[k] = fn(sd[k])


def _bad_bit_map(sd) -> None:
    k = next(k for k in sorted(sd) if k.endswith(".group_bits"))
    sd[k] = torch.full_like(sd[k], 9)


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_checkpoint_is_refused(ckpt, tmp_path, capsys, case):
    folder = _copy(ckpt, tmp_path)
    edit, word = TAMPER[case]
    edit(folder)
    with pytest.raises(FlexQuantError) as e:
        fq.load(folder)
    assert word.lower() in str(e.value).lower() and "\n" not in str(e.value)
    rc, err = run(capsys, "info", str(folder))
    assert rc == 2
    one_line_error(err)


def test_untampered_checkpoint_loads_and_info_reports_verified_bits(ckpt, capsys):
    qm = fq.load(ckpt)
    assert qm.bpw == pytest.approx(3 + 16 * 2 / 32, abs=0.2)
    rc = main(["info", str(ckpt), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert rc == 0 and all(m["bits"] == [3] for m in info["modules"].values())


def test_checkpoint_without_quant_config_is_not_read_as_a_plain_model(ckpt, tmp_path, capsys):
    folder = _copy(ckpt, tmp_path)
    (folder / "quant_config.json").unlink()
    rc, err = run(capsys, "eval", str(folder), "--windows", "1", "--seqlen", "64")
    assert rc == 2
    one_line_error(err, "quant_config.json is missing")
    with pytest.raises(FlexQuantError, match="quant_config.json is missing"):
        fq.load(folder)


def test_checkpoint_without_quant_config_or_manifest_is_still_recognised(ckpt, tmp_path, capsys):
    folder = _copy(ckpt, tmp_path)
    for name in ("quant_config.json", "manifest.json", "recipe.yaml"):
        (folder / name).unlink(missing_ok=True)
    rc, err = run(capsys, "quantize", str(folder), "--method", "rtn", "--out", str(tmp_path / "o"), "-q")
    assert rc == 2
    one_line_error(err, "flexquant checkpoint")


def test_damaged_report_only_costs_the_report(ckpt, tmp_path, caplog):
    folder = _copy(ckpt, tmp_path)
    (folder / "report.json").write_text("{broken")
    qm = fq.load(folder)
    assert qm.report == {} and "report" in caplog.text


def test_generate_on_a_tampered_checkpoint(ckpt, tmp_path, capsys):
    folder = _copy(ckpt, tmp_path)
    _edit_shard(folder, _nan_scale)
    _reseal(folder)
    rc, err = run(capsys, "generate", str(folder), "--prompt", "hello")
    assert rc == 2
    one_line_error(err, "nan")


def test_export_of_a_tampered_checkpoint(ckpt, tmp_path, capsys):
    folder = _copy(ckpt, tmp_path)
    _edit_json(folder, "config.json", lambda c: c.update(rope_theta=1.0))
    rc, err = run(capsys, "export", str(folder), "--format", "gptq", "--out", str(tmp_path / "e"))
    assert rc == 2
    one_line_error(err)
    assert not (tmp_path / "e").exists() and leftovers(tmp_path) == []


def test_eval_seqlen_beyond_the_context(ckpt, capsys):
    rc, err = run(capsys, "eval", str(ckpt), "--seqlen", "8192", "--windows", "1")
    assert rc == 2
    one_line_error(err, "context")


# ----- unexpected errors: one line, exit 1, the traceback only with --debug -----
def _boom(*a, **k):
    raise RuntimeError("something inside broke\nsecond line")


@pytest.mark.parametrize("debug", [False, True])
def test_unexpected_error_is_one_line(ckpt, capsys, monkeypatch, debug):
    monkeypatch.setattr(fq.api, "evaluate", _boom)
    rc, err = run(capsys, "eval", str(ckpt), *(["--debug"] if debug else []))
    assert rc == 1
    assert ("Traceback" in err) == debug
    last = err.strip().splitlines()[-1]
    assert last.startswith("flexquant: unexpected error: RuntimeError: something inside broke") and "--debug" in last


def test_checkpoint_error_is_a_flexquant_error():
    assert issubclass(CheckpointError, FlexQuantError)


# ----- a polite kill and the spill folders -----
def test_stale_spill_folders_of_dead_runs_are_removed(tmp_path):
    from flexquant.pipeline.capture import BlockInputs
    from flexquant.pipeline.store import ActivationStore

    stale = tmp_path / "flexquant-store-999999999-abc"
    stale.mkdir()
    (stale / "00000001.bin").write_bytes(b"x" * 10)
    live = tmp_path / f"flexquant-store-{os.getppid()}-abc"
    live.mkdir()
    store = ActivationStore("float16", max_bytes=1, offload_dir=tmp_path)
    store.put(0, BlockInputs([torch.ones(2, 4, 8)], [{}]))
    assert not stale.exists() and live.exists() and store.disk_bytes > 0
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_sigterm_cleans_up_the_spill_folder(tmp_path):
    off = tmp_path / "off"
    cmd = [sys.executable, "-m", "flexquant", "quantize", "tiny-llama", "--method", "gptq", "--nsamples", "64",
           "--seqlen", "64", "--batch-size", "1", "--max-memory", "70KB", "--offload-dir", str(off), "--out",
           str(tmp_path / "o"), "-q"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(off.glob("flexquant-store-*/*.bin")):
        time.sleep(0.05)
    assert list(off.glob("flexquant-store-*")), "the run never spilled"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert not list(off.glob("flexquant-store-*")) and not (tmp_path / "o").exists()


# ----- found by the whole-CLI rerun (bench/adversarial.py) -----
@pytest.mark.parametrize("flags", [["--limit", "2"], ["--include-path", "x"], ["--num-fewshot", "1"]])
def test_lm_eval_flags_without_tasks(ckpt, capsys, flags):
    rc, err = run(capsys, "eval", str(ckpt), "--windows", "1", "--seqlen", "64", *flags)
    assert rc == 2
    one_line_error(err, "--tasks")


def test_generate_beyond_the_context(ckpt, capsys):
    rc, err = run(capsys, "generate", str(ckpt), "--prompt", "hello", "--max-new-tokens", "100000")
    assert rc == 2
    one_line_error(err, "context")


def test_out_is_a_dangling_symlink(tmp_path, capsys):
    (tmp_path / "ln").symlink_to(tmp_path / "nowhere")
    rc, err = run(capsys, "quantize", "tiny-llama", "--method", "rtn", "--out", str(tmp_path / "ln"), "-q")
    assert rc == 2
    one_line_error(err, "symlink")


@pytest.mark.parametrize("name", ["model.layers.0.input_layernorm.weight", "model.norm.weight"])
def test_nan_norm_weight_in_a_streamed_model(fp_folder, tmp_path, capsys, name):
    folder = _edited_weights(fp_folder, tmp_path, lambda sd: sd[name].fill_(float("nan")))
    rc, err = run(capsys, "quantize", str(folder), "--method", "rtn", "--out", str(tmp_path / "o"), "-q")
    assert rc == 2
    one_line_error(err, "nan")
    assert not leftovers(tmp_path) and not (tmp_path / "o").exists()  # found before any block: nothing to resume


def test_eval_of_a_model_with_non_finite_logits(ckpt, tmp_path, capsys):
    folder = _copy(ckpt, tmp_path)
    _edit_json(folder, "config.json", lambda c: c.update(rms_norm_eps=-1.0))
    _reseal(folder)
    rc, err = run(capsys, "eval", str(folder), "--windows", "1", "--seqlen", "64")
    assert rc == 2
    one_line_error(err, "non-finite")


def test_bias_record_without_a_bias_tensor(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    _edit_json(folder, "quant_config.json", lambda q: _first_module(q).update(bias=True))
    _reseal(folder)
    with pytest.raises(FlexQuantError, match="bias"):
        fq.load(folder)


def test_report_of_a_report_json_that_is_not_utf8(ckpt, tmp_path, capsys):
    folder = _copy(ckpt, tmp_path)
    (folder / "report.json").write_bytes(b'{"a": "\xff\xfe"}')
    rc, err = run(capsys, "report", str(folder))
    assert rc == 2
    one_line_error(err, "report.json")


def test_out_where_nothing_can_be_created(tmp_path, capsys):
    rc, err = run(capsys, "quantize", "tiny-llama", "--method", "rtn", "-q", "--out", "/proc/flexquant-out")
    assert rc == 2
    one_line_error(err, "/proc")


def test_stdout_reader_gone_is_a_quiet_exit(ckpt, monkeypatch, capsys):
    class Gone:  # stdout whose reader left (`flexquant info q --json | head -0`)
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr("sys.stdout", Gone())
    rc = main(["info", str(ckpt), "--json"])
    assert rc == 141 and capsys.readouterr().err == ""

import json
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
    assert {"model.safetensors.index.json", "quant_config.json", "report.json", "config.json", "report.png",
            "recipe.yaml", "model-00001-of-00003.safetensors"} <= names
    assert not any(n.startswith(".") for n in names)  # no temporary or progress files left
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


def test_bits_out_of_range_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", "tiny-llama", "--bits", "5", "--out", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid choice" in err and "Traceback" not in err


def test_the_module_entry_point_runs(monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["flexquant", "--version"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("flexquant.cli", run_name="__main__")
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("flexquant ")


def test_methods_lists_every_method_with_its_defaults(capsys):
    import dataclasses

    from flexquant.methods import METHODS

    assert main(["methods", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == set(METHODS) >= {"rtn", "gptq", "flexible", "hiratio", "adaptive"}
    for name, cls in METHODS.items():
        fields = {f.name: f for f in dataclasses.fields(cls.Config)}
        assert set(info[name]["options"]) == set(fields)
        for opt, f in fields.items():
            default = info[name]["options"][opt]["default"]
            assert (tuple(default) if isinstance(default, list) else default) == f.default
            assert info[name]["options"][opt]["help"]
    assert main(["methods", "flexible"]) == 0
    out = capsys.readouterr().out
    assert "--feedback-alpha" in out and "default: 0.25" in out and "hiratio" not in out
    assert main(["methods", "nope", "-q"]) == 2


def test_every_option_is_a_generated_flag():
    """`flexquant quantize --help` has a flag for every run, grid, GPTQ and method field (none hand-written)."""
    import dataclasses

    from flexquant.cli import build_parser
    from flexquant.config import METHOD_CONFIGS, GPTQConfig, GridConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    help_text = sub.choices["quantize"].format_help()
    names = [f.name for c in (GridConfig, GPTQConfig, *METHOD_CONFIGS.values()) for f in dataclasses.fields(c)]
    names += ["method", "calib", "nsamples", "seqlen", "seed", "batch_size", "device"]
    missing = [n for n in names if "--" + n.replace("_", "-") not in help_text]
    assert not missing and "--recipe" in help_text


@pytest.mark.parametrize("argv,msg", [
    (["--method", "flexible", "--b-lo", "3"],
     "--b-lo applies to --method hiratio only (this run is --method flexible)"),
    (["--method", "hiratio", "--a-bits", "4"], "--a-bits applies to --method adaptive only"),
    (["--bpw", "3"], "--bpw applies to --method flexible or hiratio only (this run is --method gptq)"),
    (["--method", "flexible", "--protect", "both"], "invalid choice"),
    (["--method", "nope"], "unknown method 'nope'"),
])
def test_a_flag_of_another_method_is_a_clear_error(argv, msg, tmp_path, capsys):
    try:
        rc = main(["quantize", "tiny-llama", *argv, "--out", str(tmp_path / "o"), "-q"])
    except SystemExit as e:  # argparse's own checks (choices) exit 2 too
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err and not (tmp_path / "o").exists()


def test_recipe_flags_override_it_and_bad_recipes_fail_clearly(ckpt, tmp_path, capsys):
    from flexquant.recipe import read_recipe

    recipe = read_recipe(ckpt)  # a checkpoint folder stands for its recipe.yaml
    assert recipe.method == "gptq" and recipe.grid.bits == 4 and recipe.grid.scale_bits == 16  # resolved
    out = tmp_path / "r3"
    assert main(["quantize", "--recipe", str(ckpt / "recipe.yaml"), "--bits", "3", "--out", str(out), "-q"]) == 0
    assert read_recipe(out).grid.bits == 3 and read_recipe(out).nsamples == recipe.nsamples
    bad = {"missing.yaml": None, "broken.yaml": "model: [unclosed", "list.yaml": "- 1\n- 2\n",
           "field.yaml": "model: tiny-llama\nbitz: 3\n", "type.yaml": "nsamples: many\n",
           "grid.json": json.dumps({"grid": {"bits": "four"}}), "opt.yaml": "method: flexible\noptions: {b_lo: 2}\n"}
    msgs = {"missing.yaml": "does not exist", "broken.yaml": "is not valid YAML", "list.yaml": "must hold a mapping",
            "field.yaml": "unknown QuantConfig fields ['bitz']", "type.yaml": "nsamples='many' must be int",
            "grid.json": "grid.bits='four' must be int", "opt.yaml": "'b_lo' does not apply to --method flexible"}
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        assert main(["quantize", "--recipe", str(tmp_path / name), "--out", str(tmp_path / "x"), "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msgs[name] in err[0], (name, err)

"""Hostile and broken folders at the interop boundary: a foreign (GPTQ / compressed-tensors) import never reads
a file outside its folder nor a pickle, malformed JSON is a one-line `CheckpointError`, and an export copies
only the allow-listed tokenizer / generation / chat-template files of its source."""

import json
import logging
import os
import shutil

import pytest
import torch

import flexquant as fq
from flexquant.cli import main
from flexquant.errors import CheckpointError
from flexquant.interop import export_checkpoint, foreign_info
from flexquant.interop.common import COPIED_FILES

INDEX = "model.safetensors.index.json"


def reseal(folder):
    """The checkpoint's manifest rewritten over its current files (so the case reaches what it tests)."""
    from flexquant.format.validate import MANIFEST, write_manifest

    (folder / MANIFEST).unlink()
    write_manifest(folder, {})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny flexquant checkpoint (RTN, 4 bits)."""
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    qm = fq.quantize("tiny-llama", group_size=32, progress=False, method="rtn", bits=4, calib_ids=calib)
    return fq.save(qm, tmp_path_factory.mktemp("adv") / "q", plot=False)


@pytest.fixture(scope="module")
def foreign(source, tmp_path_factory):
    """The checkpoint exported to GPTQ: a foreign folder as other tools write it (one model.safetensors)."""
    out = tmp_path_factory.mktemp("adv_gptq") / "g"
    export_checkpoint(source, out, "gptq")
    return out


@pytest.fixture
def folder(foreign, tmp_path):
    """A fresh copy of the foreign folder, under tmp_path/work/g, to tamper with."""
    return shutil.copytree(foreign, tmp_path / "work" / "g")


def _shard(folder, name):
    """Move the weights into one shard called ``name`` (relative to the folder) named by an index."""
    os.replace(folder / "model.safetensors", folder / "moved.safetensors")
    (folder / INDEX).write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": name}}))


def _refused(folder, *needles, call=foreign_info):
    with pytest.raises(CheckpointError) as e:
        call(folder)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def _outside(tmp_path, folder):
    """A valid safetensors file outside the folder (a real target, so only the check can stop the read)."""
    (tmp_path / "outside").mkdir()
    return shutil.copy(folder / "moved.safetensors", tmp_path / "outside" / "model.safetensors")


# ---- paths from the index --------------------------------------------------------------------------------

def test_index_entry_climbing_out_with_dotdot_is_refused(folder, tmp_path):
    _shard(folder, "../../outside/model.safetensors")
    _outside(tmp_path, folder)
    _refused(folder, INDEX, "../../outside/model.safetensors", "outside", "refusing to read it")


def test_index_entry_with_an_absolute_path_is_refused(folder, tmp_path):
    _shard(folder, "placeholder.safetensors")
    target = _outside(tmp_path, folder)
    (folder / INDEX).write_text(json.dumps({"weight_map": {"a": str(target)}}))
    _refused(folder, INDEX, str(target), "a file outside", "refusing")


def test_index_entry_that_is_a_symlink_leading_outside_is_refused(folder, tmp_path):
    _shard(folder, "model-00001-of-00001.safetensors")
    target = _outside(tmp_path, folder)
    (folder / "model-00001-of-00001.safetensors").symlink_to(target)
    _refused(folder, "model-00001-of-00001.safetensors", "a symlink to", str(target), "refusing")


def test_index_entry_through_a_symlinked_subfolder_is_refused(folder, tmp_path):
    _shard(folder, "sub/model.safetensors")
    _outside(tmp_path, folder)
    (folder / "sub").symlink_to(tmp_path / "outside", target_is_directory=True)
    _refused(folder, "sub/model.safetensors", "a symlink to", "refusing")


def test_symlinks_and_subfolders_inside_the_folder_are_fine(folder):
    (folder / "shards").mkdir()
    _shard(folder, "shards/../shards/link.safetensors")
    (folder / "shards" / "link.safetensors").symlink_to(folder / "moved.safetensors")
    info = foreign_info(folder)
    assert info["format"] == "gptq" and len(info["modules"]) == 14


def test_index_naming_a_missing_file_is_refused(folder):
    _shard(folder, "model-00002-of-00002.safetensors")
    _refused(folder, INDEX, "model-00002-of-00002.safetensors", "missing", "incomplete")


def test_index_naming_a_pickle_is_refused_without_reading_it(folder):
    _shard(folder, "pytorch_model.bin")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    _refused(folder, "pytorch_model.bin", "not a .safetensors file", "never loads pickles")


@pytest.mark.parametrize("index, needle", [
    ('{"weight_map": {"a": "model.safe', "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ('{"metadata": {}}', "has no weight_map"),
    ('{"weight_map": {"a": ["x.safetensors"]}}', "not a file name"),
    ("[" * 100_000, "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),
])
def test_malformed_index_is_a_one_line_error_naming_it(folder, index, needle):
    _shard(folder, "moved.safetensors")
    (folder / INDEX).write_bytes(index if isinstance(index, bytes) else index.encode())
    _refused(folder, INDEX, needle)


def test_symlink_loop_is_refused(folder):
    _shard(folder, "a.safetensors")
    (folder / "a.safetensors").symlink_to(folder / "b.safetensors")
    (folder / "b.safetensors").symlink_to(folder / "a.safetensors")
    _refused(folder, "a.safetensors", "refusing")


def test_corrupt_safetensors_is_a_one_line_error(folder):
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    _refused(folder, "model.safetensors", "could not be read as safetensors")


# ---- configs and files looked up by name -------------------------------------------------------------------

def test_folder_with_only_pickles_is_refused_asking_for_safetensors(folder):
    os.replace(folder / "model.safetensors", folder / "pytorch_model.bin")
    _refused(folder, "pytorch_model.bin are pickles", "safetensors only", "convert them to safetensors")


def test_config_json_that_is_a_symlink_leading_outside_is_refused(folder, tmp_path):
    shutil.move(folder / "config.json", tmp_path / "config.json")
    (folder / "config.json").symlink_to(tmp_path / "config.json")
    _refused(folder, "config.json is a symlink to", "refusing", call=fq.load)


def test_weights_that_are_a_symlink_leading_outside_are_refused(folder, tmp_path):
    shutil.move(folder / "model.safetensors", tmp_path / "w.safetensors")
    (folder / "model.safetensors").symlink_to(tmp_path / "w.safetensors")
    _refused(folder, "model.safetensors is a symlink to", "refusing")


@pytest.mark.parametrize("name, text, needle", [
    ("config.json", '{"model_type": "llama", ', "config.json is not valid JSON"),
    ("config.json", '"llama"', "config.json holds a JSON str"),
    ("quantize_config.json", "{bits: 4}", "quantize_config.json is not valid JSON"),
])
def test_malformed_configs_are_one_line_errors_naming_the_file(folder, name, text, needle):
    (folder / name).write_text(text)
    _refused(folder, needle, call=fq.load)


def test_quantization_config_that_is_not_an_object_is_refused(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = "gptq"
    (folder / "config.json").write_text(json.dumps(cfg))
    os.remove(folder / "quantize_config.json")
    _refused(folder, "quantization_config is a JSON str", call=fq.load)


def test_config_transformers_cannot_build_is_a_one_line_error(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "no-such-architecture"
    (folder / "config.json").write_text(json.dumps(cfg))
    _refused(folder, "config.json does not describe a model transformers can build")


def test_quantize_config_without_config_json_is_refused(folder):
    os.remove(folder / "config.json")
    _refused(folder, "has no config.json")


def _edit_weights(folder, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_qzeros_is_refused_naming_the_tensor(folder):
    _edit_weights(folder, lambda sd: sd.pop("model.layers.0.mlp.down_proj.qzeros"))
    _refused(folder, "model.layers.0.mlp.down_proj.qzeros", "incomplete", call=fq.load)


@pytest.mark.parametrize("group_size", [16, 0, "x"])
def test_group_size_the_tensors_contradict_is_refused(folder, group_size):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = group_size
    (folder / "config.json").write_text(json.dumps(cfg))
    _refused(folder, f"group_size {group_size!r}", "groups of 32 columns", call=fq.load)


def test_tokenizer_file_leading_outside_is_refused_before_it_is_read(folder, tmp_path):
    shutil.move(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    (folder / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    _refused(folder, "tokenizer.json is a symlink to", "refusing", call=fq.load)


def test_the_untampered_folder_loads(folder):
    qm = fq.load(folder)
    assert qm.tokenizer is not None and qm.report["foreign"]["format"] == "gptq"


# ---- export: only the allow-list is copied -----------------------------------------------------------------

STRAY = ["pytorch_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth", "scheduler.pkl", "notes.txt",
         "evil.py", "README.md"]


def test_export_copies_only_the_allow_listed_files(source, tmp_path, caplog):
    src = shutil.copytree(source, tmp_path / "src")
    for name in STRAY:
        (src / name).write_bytes(b"\x80\x04 stray")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "merges.txt").write_text("#version: 0.2\n")
    (src / "store").mkdir()  # a symlink that stays inside the folder is copied under its own name
    (src / "store" / "v.json").write_text('{"a": 0}')
    (src / "vocab.json").symlink_to(src / "store" / "v.json")
    reseal(src)  # the files added after the save listed in the manifest, as an exporting user would
    with caplog.at_level(logging.WARNING):
        export_checkpoint(src, tmp_path / "out", "gptq")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert not names & set(STRAY)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
            "merges.txt", "vocab.json"} <= names
    assert names <= COPIED_FILES | {"model.safetensors", "config.json", "quantize_config.json",
                                    "flexquant_export.json"}
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "{{ messages }}"
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(name in warned for name in [*STRAY, "store"])  # left out, but not silently
    assert not (tmp_path / "out" / "vocab.json").is_symlink()


def test_allow_list_holds_no_weights_or_pickles():
    assert all(n.endswith((".json", ".txt", ".model", ".jinja")) for n in COPIED_FILES)
    assert {"tokenizer.json", "generation_config.json", "chat_template.jinja", "vocab.json"} <= COPIED_FILES


def test_export_refuses_a_tokenizer_file_leading_outside_the_source(source, tmp_path):
    src = shutil.copytree(source, tmp_path / "src")
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    os.remove(src / "tokenizer_config.json")
    (src / "tokenizer_config.json").symlink_to(tmp_path / "secret.json")
    _refused(src, "tokenizer_config.json is a symlink to", "refusing",
             call=lambda p: export_checkpoint(p, tmp_path / "out", "gptq"))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left


def test_export_of_a_source_with_malformed_config_json_is_a_one_line_error(source, tmp_path):
    src = shutil.copytree(source, tmp_path / "src")
    (src / "config.json").write_text('{"model_type": ')
    reseal(src)
    _refused(src, "config.json", "valid JSON", call=lambda p: export_checkpoint(p, tmp_path / "out", "gptq"))


# ---- through the command line ------------------------------------------------------------------------------

def _cli_error(capsys, argv, *needles):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexquant: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_cli_info_refuses_index_traversal(folder, tmp_path, capsys):
    _shard(folder, "../../outside/model.safetensors")
    _outside(tmp_path, folder)
    _cli_error(capsys, ["info", str(folder)], "../../outside/model.safetensors", "refusing to read it")


def test_cli_eval_refuses_malformed_index(folder, capsys):
    _shard(folder, "moved.safetensors")
    (folder / INDEX).write_text("{")
    _cli_error(capsys, ["eval", str(folder), "--seqlen", "32", "--windows", "1", "-q"], INDEX, "not valid JSON")


def test_cli_export_refuses_a_symlink_leading_outside(source, tmp_path, capsys):
    src = shutil.copytree(source, tmp_path / "src")
    (tmp_path / "gen.json").write_text("{}")
    os.remove(src / "generation_config.json")
    (src / "generation_config.json").symlink_to(tmp_path / "gen.json")
    _cli_error(capsys, ["export", str(src), "--format", "gptq", "--out", str(tmp_path / "o"), "-q"],
               "generation_config.json is a symlink to", "refusing")

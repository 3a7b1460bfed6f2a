import json

import pytest
import torch

import flexquant as fq
from flexquant.errors import CheckpointError, FlexQuantError
from flexquant.format.checkpoint import read_tensors


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    g = torch.Generator().manual_seed(2)
    calib = torch.randint(0, 256, (8, 128), generator=g)
    qm = fq.quantize("tiny-llama", method="gptq", bits=3, group_size=32, calib_ids=calib, progress=False)
    path = fq.save(qm, tmp_path_factory.mktemp("ckpt") / "q")
    return qm, path


def test_load_reproduces_logits_and_generates(saved):
    qm, path = saved
    loaded = fq.load(path)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, qm.model(ids).logits)
    text = fq.generate(loaded, "def f(x):", max_new_tokens=5)
    assert isinstance(text, str)
    assert loaded.config == qm.config


def test_bpw_from_file_equals_bpw_claimed(saved):
    qm, path = saved
    qc = json.loads((path / "quant_config.json").read_text())
    bits = weights = 0
    tensors = read_tensors(path, qc)  # every shard, each checked against its sha256
    assert qc["format_version"] == 4 and len(qc["checksums"]) == len(qm.model.model.layers) + 1
    for mod, spec in qc["modules"].items():
        for key, t in tensors.items():
            if key.startswith(mod + ".") and not key.endswith(".bias"):
                bits += t.numel() * t.element_size() * 8
        weights += spec["in_features"] * spec["out_features"]
    assert bits / weights == pytest.approx(qm.report["summary"]["bpw"], rel=1e-12)
    assert bits / weights == pytest.approx(qm.bpw, rel=1e-12)
    report = json.loads((path / "report.json").read_text())
    assert report["summary"]["bpw"] == pytest.approx(bits / weights)
    # 3-bit codes + fp16 scale + uint8 zero per 32 columns, plus bit maps and act-order permutations
    assert 3 + 24 / 32 < bits / weights < 3 + 24 / 32 + 0.2


def test_tampered_and_truncated_checkpoints_are_refused(saved, tmp_path):
    import shutil

    _, path = saved
    for damage in ("truncate", "flip", "no_config", "version"):
        bad = tmp_path / damage
        shutil.copytree(path, bad)
        f = bad / sorted(json.loads((bad / "quant_config.json").read_text())["checksums"])[0]  # a block shard
        if damage == "truncate":
            f.write_bytes(f.read_bytes()[:-100])
        elif damage == "flip":
            data = bytearray(f.read_bytes())
            data[-10] ^= 0xFF
            f.write_bytes(bytes(data))
        elif damage == "no_config":
            (bad / "quant_config.json").unlink()
        else:
            qc = json.loads((bad / "quant_config.json").read_text())
            qc["format_version"] = 99
            (bad / "quant_config.json").write_text(json.dumps(qc))
        with pytest.raises(CheckpointError):
            fq.load(bad)


def test_save_refuses_existing_and_leaves_nothing_half_written(saved, tmp_path, monkeypatch):
    qm, path = saved
    with pytest.raises(FlexQuantError, match="already exists"):
        fq.save(qm, path)
    import flexquant.format.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_file", boom)
    with pytest.raises(OSError):
        fq.save(qm, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no temp folder, no partial output


def test_checkpoints_with_an_older_config_record_still_load(tmp_path, caplog):
    """A quant_config.json written before the typed configs (renamed or unknown options) loads: renamed
    options are mapped, an unreadable record only costs the config."""
    qm = fq.quantize("tiny-llama", method="rtn", bits=4, group_size=32, progress=False)
    path = fq.save(qm, tmp_path / "ck", plot=False)
    qc_file = path / "quant_config.json"
    qc = json.loads(qc_file.read_text())
    for options, method, expect in (({"bpw": 3.0, "seed": 2}, "flexible", 2), ({"no_such_option": 1}, "gptq", None)):
        qc["quant_config"].update(method=method, options=options)
        qc_file.write_text(json.dumps(qc))
        loaded = fq.load(path, verify=False)
        if expect is None:
            assert loaded.config is None and "does not parse" in caplog.text
        else:
            assert loaded.config.options.rotation_seed == expect
        assert loaded.model(torch.zeros(1, 4, dtype=torch.long)).logits.shape[-1] == 258

"""bench/foundation.py's job runner: a finished quantization folder whose recipe matches is reused, any other
difference (options, grid, calibration shape) runs the job."""

import subprocess
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file

from bench import foundation


def finished(tmp_path, options, calib_shape=(4, 16)):
    work = tmp_path / "work"
    work.mkdir()
    save_file({"input_ids": torch.zeros(calib_shape, dtype=torch.long)}, str(work / "calib.safetensors"))
    out = work / "run"
    out.mkdir()
    (out / "report.json").write_text("{}")
    recipe = {"method": "flexible", "grid": {"bits": 4, "group_size": 64}, "nsamples": 4, "seqlen": 16,
              "options": options}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return work, out


@pytest.mark.parametrize("change, reused", [({}, True), ({"options": {"bpw": 2.5}}, False),
                                            ({"bits": 3}, False), ({"group_size": 128}, False),
                                            ({"calib_shape": (8, 16)}, False)])
def test_flexquant_job_reuses_only_a_matching_finished_run(tmp_path, monkeypatch, change, reused):
    work, out = finished(tmp_path, {"bpw": 3.5, "candidates": [3, 4], "lfd": True}, change.get("calib_shape", (4, 16)))
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    args = SimpleNamespace(model_dir="m", group_size=change.get("group_size", 64))
    proc = foundation.flexquant_job(out, "flexible", change.get("bits", 4),
                                    change.get("options", {"bpw": 3.5, "candidates": [3, 4]}), args, work)
    assert proc.returncode == 0
    assert (not ran) == reused
    if ran:
        assert ran[0][ran[0].index("--out") + 1] == str(out)


def test_row_cache_fresh_does_not_bring_back_stale_rows(tmp_path):
    """Rows finished by another invocation are merged on every write, but with --fresh the rows on disk at the
    start are stale: they stay out."""
    old = foundation.RowCache(tmp_path, fresh=False)
    old.put("a", {"v": 1})
    old.put("b", {"v": 1})
    fresh = foundation.RowCache(tmp_path, fresh=True)
    other = foundation.RowCache(tmp_path, fresh=False)
    other.put("c", {"v": 2})  # finished meanwhile by another invocation
    fresh.put("a", {"v": 3})
    assert fresh.get("b") is None and fresh.get("c") == {"v": 2} and fresh.get("a") == {"v": 3}
    assert foundation.RowCache(tmp_path, fresh=False).get("a") == {"v": 3}

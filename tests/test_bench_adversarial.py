"""bench/adversarial.py's catalog, prep steps and classification; no flexquant subprocess runs."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

from bench import adversarial as adv


def test_the_catalog_has_200_unique_cases_of_every_kind():
    cases = adv.catalog()
    assert len(cases) >= 200
    assert len({c.name for c in cases}) == len(cases)
    kinds = Counter(c.kind for c in cases)
    assert set(kinds) == {"args", "out", "text", "model", "tamper-json", "tamper-tensor", "tamper-file", "interop",
                          "kill", "control"}
    assert all(c.expect in ("error", "ok", "either") for c in cases)
    assert all(c.kill is None or c.kind == "kill" for c in cases)
    quick = adv.quick_subset(cases)
    assert 30 <= len(quick) <= 50 and set(c.kind for c in quick) == set(kinds)


def test_every_prep_step_is_known():
    for c in adv.catalog():
        for part in filter(None, (x.strip() for x in c.prep.split(";"))):
            assert part.split()[0] in adv.STEPS, (c.name, part)


def test_json_edit_and_reseal(tmp_path):
    q = tmp_path / "q"
    q.mkdir()
    (q / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 1.0}, "a": 1}))
    (q / "quant_config.json").write_text(json.dumps({"modules": {"b": {"bits": [4]}, "a": {"bits": [4]}},
                                                     "checksums": {"config.json": "x"}}))
    (q / "manifest.json").write_text(json.dumps({"files": {"config.json": "x", "quant_config.json": "y"}}))
    adv.apply("json config.json rope_parameters/rope_theta 500.0; json config.json a del; "
              "json quant_config.json modules/*/bits [8]; reseal", tmp_path, {})
    cfg, qc = json.loads((q / "config.json").read_text()), json.loads((q / "quant_config.json").read_text())
    assert cfg == {"rope_parameters": {"rope_theta": 500.0}}
    assert qc["modules"]["a"]["bits"] == [8] and qc["modules"]["b"]["bits"] == [4]
    sha = lambda n: hashlib.sha256((q / n).read_bytes()).hexdigest()
    assert qc["checksums"] == {"config.json": sha("config.json")}
    assert json.loads((q / "manifest.json").read_text())["files"] == {n: sha(n) for n in ("config.json",
                                                                                          "quant_config.json")}


def test_classification_of_synthetic_outcomes():
    err1 = "flexquant: error: q/quant_config.json: checksum mismatch; re-save the checkpoint\n"
    assert adv.classify("error", 2, err1) == "clean-error"
    assert adv.classify("error", 2, "WARNING something\n" + err1) == "clean-error"
    tb = "Traceback (most recent call last):\n  File \"x\", line 1\nKeyError: 'bits'\n"
    assert adv.classify("error", 1, tb) == "traceback"
    assert adv.classify("error", 0, "") == "wrong-result-exit-0"  # a tampered checkpoint that loads
    assert adv.classify("either", 0, "", wrong="perplexity nan") == "wrong-result-exit-0"
    assert adv.classify("either", 0, "") == "accepted"
    assert adv.classify("ok", 0, "") == "ok-control" and adv.classify("ok", 2, err1) == "control-failed"
    assert adv.classify("error", 2, err1, left=[".o.tmp-1-ab"]) == "leftovers"
    assert adv.classify("error", 2, "flexquant: error: two\nlines\n") == "messy-error"
    assert adv.classify("error", None, "", timed_out=True) == "timeout"
    assert adv.classify("error", 1, "flexquant: unexpected error: RuntimeError: x (rerun with --debug)") == \
        "clean-error"
    assert adv.classify_kill(True, 2, ["", "flexquant: error: missing", ""], 0, []) == "lost-checkpoint"
    assert adv.classify_kill(True, 0, ["", "", ""], 0, [".q.partial"]) == "leftovers"
    assert adv.classify_kill(True, 0, ["", "", ""], 0, []) == "survived-kill"
    assert adv.classify_kill(False, 2, ["", "", ""], 0, []) == "survived-kill"  # a first save: nothing to lose


def test_judge_reads_the_result():
    s = {"bpw": 4.0}
    assert adv.judge(["eval", "q", "--json"], '{"perplexity": 12.5}\n', s) == (12.5, None)
    assert adv.judge(["eval", "q", "--json"], '{"perplexity": NaN}\n', s)[1] == "perplexity nan"
    wrong = adv.judge(["info", "q", "--json"], json.dumps({"bpw": 1.0}, indent=2), s)[1]
    assert wrong.startswith("bpw 1.0000 reported")
    assert adv.judge(["generate", "q"], "text", s) == (None, None)


def test_tensor_and_file_steps(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    q = tmp_path / "q"
    q.mkdir()
    save_file({"a.scales": torch.ones(2, 2, dtype=torch.float16), "a.perm": torch.arange(4, dtype=torch.int16),
               "b.weight": torch.ones(3)}, q / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    adv.apply("tensor .scales nan; tensor .perm dup; tensor b.weight delete; tensor .scales extra", tmp_path, {})
    sd = load_file(q / "model-00001-of-00001.safetensors")
    assert sd["a.scales"].dtype == torch.float16 and sd["a.scales"].isnan().sum() == 1
    assert sd["a.perm"].tolist() == [0, 0, 2, 3] and "b.weight" not in sd and "a.extra" in sd
    (q / "config.json").write_text("{}")
    adv.apply("file flip shard; file link-passwd config.json", tmp_path, {})
    assert (q / "config.json").is_symlink() and (q / "model-00001-of-00001.safetensors").stat().st_size > 0

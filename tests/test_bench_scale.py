"""bench/synth.py (synthetic sharded Llama folders) and bench/scale.py's bookkeeping; no quantization runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import scale, synth  # noqa: E402

TINY = synth.SIZES["tiny"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "tiny"
    synth.generate(TINY, out, seed=0, shard_mb=5, name="tiny")  # ~6.3 MB per embedding -> 3 shards
    return out


def test_named_sizes_are_what_the_docs_say():
    assert abs(synth.SIZES["0.5b"].params / 1e9 - 0.5) < 0.05
    assert abs(synth.SIZES["2b"].params / 1e9 - 1.9) < 0.1
    assert abs(synth.SIZES["1.1b"].params / 1e9 - 1.17) < 0.05
    for short, deep in synth.DEPTH_PAIRS:
        a, b = synth.SIZES[short], synth.SIZES[deep]
        assert (a.hidden, a.intermediate, a.heads, a.kv_heads) == (b.hidden, b.intermediate, b.heads, b.kv_heads)
        assert b.layers == 2 * a.layers
    s = TINY
    per_layer = 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_heads * s.head_dim + 3 * s.hidden * s.intermediate
    assert s.params == 2 * s.vocab * s.hidden + s.layers * (per_layer + 2 * s.hidden) + s.hidden


def test_shards_index_and_config(tiny_dir):
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    files = sorted({f for f in index["weight_map"].values()})
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    assert len(files) == 3
    assert index["metadata"]["total_size"] == TINY.fp16_bytes
    assert set(index["weight_map"]) == {n for n, _ in TINY.tensors()}
    for f in files:
        assert (tiny_dir / f).stat().st_size <= 5 * 10**6 + 10**4 or len(
            [n for n, v in index["weight_map"].items() if v == f]) == 1
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == 49152
    assert (tiny_dir / "tokenizer.json").is_file()
    man = json.loads((tiny_dir / "synth.json").read_text())
    assert man["params"] == TINY.params and man["shards"] == 3


def test_loads_with_transformers(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.dtype == torch.float16
    sd = model.state_dict()
    for name, shape in TINY.tensors():
        assert tuple(sd[name].shape) == shape, name
        assert sd[name].dtype == torch.float16
    assert sd["lm_head.weight"].data_ptr() != sd["model.embed_tokens.weight"].data_ptr()
    assert not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    assert torch.all(sd["model.layers.1.input_layernorm.weight"] == 1)
    w = sd["model.layers.0.mlp.up_proj.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model.float()(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


def test_seeded_and_layout_independent(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    other = tmp_path / "one-shard"
    synth.generate(TINY, other, seed=0, shard_mb=500)
    assert json.loads((other / "synth.json").read_text())["shards"] == 1
    one = load_file(other / "model-00001-of-00001.safetensors")
    idx = json.loads((tiny_dir / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "lm_head.weight"):
        assert torch.equal(one[name], load_file(tiny_dir / idx[name])[name])
    chunks = list(synth.tensor_chunks("x", (100, 64), seed=0, chunk_bytes=64 * 4 * 30))
    assert len(chunks) == 4 and torch.equal(torch.cat(chunks), next(synth.tensor_chunks("x", (100, 64), seed=0)))
    assert not torch.equal(torch.cat(chunks), next(synth.tensor_chunks("x", (100, 64), seed=1)))


def test_generate_refuses_to_overwrite(tiny_dir):
    with pytest.raises(FileExistsError):
        synth.generate(TINY, tiny_dir)


def test_plan_shards_limit():
    t = [("a", (10,)), ("b", (100,)), ("c", (10,)), ("d", (1000,)), ("e", (5,))]
    shards = synth.plan_shards(t, shard_bytes=250)
    assert [[n for n, _ in s] for s in shards] == [["a", "b", "c"], ["d"], ["e"]]  # 2 bytes a value


def _row(size, method, kind="flexquant", rss=1000.0, **kw):
    s = synth.SIZES[size]
    r = {"kind": kind, "size": size, "method": method, "flags": [], "nsamples": 32, "seqlen": 512,
         "params": s.params, "layers": s.layers, "label": scale.METHODS.get(method, ("llm-compressor gptq",))[0],
         "status": "ok", "peak_rss_mib": rss, "tree_rss_peak_mib": rss + 1, "wall_s": 12.3, "bpw": 4.25,
         "store_bytes": None}
    r.update(kw)
    return r


def test_table_and_depth_summary():
    rows = [_row("w512-l6", "gptq", rss=800.0), _row("0.1b", "gptq", rss=880.0, store_bytes=123_456_789),
            _row("0.5b", "gptq", flags=["--max-memory", "512MB"], bpw=None),
            _row("0.5b", "llmc-gptq", kind="peer"),
            _row("0.5b", "gptq", kind="distributed", status="skipped", error=["no torchrun | support"])]
    text = scale.table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(ln.count("|") == lines[0].count("|") for ln in lines[2:4])
    assert "| w512-l6 | 73M | 6 | flexquant gptq w4 g128 | — | 800 | 801 | 12 | — | 4.250 |" in text
    assert "123.46 MB" in lines[3]
    assert "--max-memory 512MB" in lines[4] and lines[4].endswith("| — |")
    assert "peer llm-compressor" in lines[5]
    assert "skipped: no torchrun \\| support" in lines[6]
    summary = scale.depth_summary(rows)
    assert len(summary) == 1 and summary[0]["rss_ratio"] == pytest.approx(1.1)
    line = scale.depth_lines(summary)[0]
    assert "6 → 12 layers" in line and "ratio **1.10**" in line


def test_plan_keys_and_commands(tmp_path):
    import argparse

    args = argparse.Namespace(sizes="0.5b,0.1b", depth=False, methods="gptq,flexible", flags=["", "--max-memory 1GB"],
                              peer_sizes="0.5b", distributed_sizes="0.5b", nsamples=32, seqlen=512,
                              peer_dtype="float32", nproc=2, device="cpu")
    rows = scale.plan(args)
    assert [r["size"] for r in rows[:4]] == ["0.1b"] * 4  # smallest first
    assert len(rows) == 2 * 2 * 2 + 1 + 2 and len({scale.row_key(r) for r in rows}) == len(rows)
    fq = scale.command(rows[1], tmp_path / "m", tmp_path / "o", tmp_path / "s", None, args)
    assert fq[-2:] == ["--max-memory", "1GB"] and "--offload-dir" in fq and "--group-size" in fq
    peer = next(r for r in rows if r["kind"] == "peer")
    cmd = scale.command(peer, tmp_path / "m", tmp_path / "o", None, tmp_path / "c.safetensors", args)
    assert "--measure-only" in cmd and str(tmp_path / "c.safetensors") in cmd
    dist = scale.command(rows[-1], tmp_path / "m", tmp_path / "o", None, None, args)
    assert dist[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node", "2"]


def test_store_from_report():
    assert scale.store_from_report({"summary": {"bpw": 4}}) == (None, None)
    rec = {"dtype": "float16", "peak_disk_bytes": 99, "peak_memory_bytes": 5}
    assert scale.store_from_report({"memory": {"store": rec}}) == (rec, 99)


def test_measure_records_child_peak(tmp_path):
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.3)"
    res = scale.measure([sys.executable, "-c", code], tmp_path / "log", tmp_path, interval=0.05, timeout=60)
    assert res["rc"] == 0 and res["peak_rss_mib"] > 200 and res["tree_rss_peak_mib"] > 150


def test_summary_takes_newest_rows_and_checks_bars(tmp_path):
    from bench import scale_summary

    def dump(name, *rows):
        (tmp_path / name).write_text(json.dumps({"rows": list(rows)}))

    def row(size, method, rss, date, code, **kw):
        r = _row(size, method, rss=rss, date=date, code=code, **kw)
        return {**r, "key": scale.row_key(r), "rc": 0 if r["status"] == "ok" else 1}

    dump("scale_old.json", row("2b", "gptq", 1600.0, "2026-01-01", "aaa"))
    dump("scale_new.json", row("2b", "gptq", 1300.0, "2026-01-02", "bbb"),
         row("2b", "gptq", 1000.0, "2026-01-02", "bbb", flags=["--max-memory", "512MB"]))
    dump("scale_before_x.json", row("2b", "gptq", 900.0, "2026-01-09", "old"))  # a baseline rerun: left out
    dump("scale_d1.json", row("w512-l6", "gptq", 600.0, "2026-01-03", "ccc"))
    dump("scale_d2.json", row("0.1b", "gptq", 700.0, "2026-01-03", "ccc"),
         row("1.1b", "flexible", 2000.0, "2026-01-04", "ccc", status="failed"))
    text = scale_summary.write(tmp_path)
    assert (tmp_path / "scale.md").read_text() == text
    data = json.loads((tmp_path / "scale.json").read_text())
    by_bar = {b["bar"]: b for b in data["bars"]}
    plain = by_bar["GPTQ on the 2b model (defaults): peak < 1.5 GB"]
    assert plain["met"] is True and plain["measured"].startswith("1300 MiB") and "bbb" in plain["source"]
    budget = by_bar["GPTQ on the 2b model with --max-memory 512MB: peak < 1 GB"]
    assert budget["met"] is False and "1.05 GB" in budget["measured"]  # 1000 MiB is over 1 GB (decimal)
    depth = [b for b in data["bars"] if b["bar"].startswith("Depth")]
    assert len(depth) == 1 and depth[0]["met"] is False and "+16.7%" in depth[0]["measured"]  # across files, one code
    assert any("1.1b flexible: no finished CPU row: failed" in m for m in data["missing"])
    assert any(m.startswith("- 0.5b gptq") for m in data["missing"])
    assert by_bar["When a GPU is lent: the 1.1b model on one GPU, with the device peak"]["met"] is None
    assert len(data["rows"]) == 4 and "| **not met** |" in text


def test_measure_stops_at_the_timeout_and_counts_finished_blocks(tmp_path):
    res = scale.measure([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "log", None, interval=0.05,
                        timeout=0.5)
    assert res["timed_out"] and res["rc"] != 0 and res["wall_s"] < 10
    assert scale._blocks_finished(tmp_path / "none") == 0
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "progress.json").write_text(json.dumps({"blocks": 7}))
    assert scale._blocks_finished(tmp_path / "p") == 7

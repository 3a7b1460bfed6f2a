"""bench/results/scale.md: the newest measured row of every scaling run and issue 21's bars checked against
them, gathered from the committed bench/results/scale_*.json (each written by one `python -m bench.scale` run,
which calls this at its end) and bench/results/scale_smollm2_flex.json (the real-model FlexibleLLM run).

    python -m bench.scale_summary                   # writes bench/results/scale.md and scale.json

Nothing here is typed in by hand: each figure is read from the row that measured it, and each row names the
commit it ran and the file it came from. A row that did not finish is listed as such, never as a result. Files
named scale_before*.json hold older code rerun for a comparison and are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9  # the bars are in decimal GB
MIB = 2**20
SMOLLM2_PPL = 10.77  # the issue's FlexibleLLM 3.5-bpw perplexity on the developers' windows
GRID_METHODS = ("gptq", "flexible")
BASELINE_PREFIX = "scale_before"  # older code rerun for a before/after comparison: not a current row
WIDE_PAIRS = (("w2048-l2", "w2048-l4"),)  # the 2b width at 2 and 4 layers (not in bench.scale's default plan)


def _key(row: dict) -> str:
    from bench.scale import row_key

    return row_key(row) + ("|gpu" if row.get("report_peak_device_mb") else "")


def collect(results: Path) -> tuple[dict[str, dict], dict[str, dict], dict[str, list[dict]]]:
    """(newest finished row per run key, newest unfinished row per key that never finished, the finished rows
    of each file). Each row gets ``file``."""
    done: dict[str, dict] = {}
    unfinished: dict[str, dict] = {}
    by_file: dict[str, list[dict]] = {}
    for f in sorted(results.glob("scale_*.json")):
        if f.name.startswith(BASELINE_PREFIX):
            continue
        data = json.loads(f.read_text())
        for row in data.get("rows", []) if isinstance(data, dict) else []:
            if not isinstance(row, dict) or "kind" not in row or "size" not in row:
                continue
            row = {**row, "file": f.name}
            key = _key(row)
            target = done if row.get("status") == "ok" else unfinished
            if row.get("date", "") >= target.get(key, {}).get("date", ""):
                target[key] = row
            if row.get("status") == "ok":
                by_file.setdefault(f.name, []).append(row)
    unfinished = {k: r for k, r in unfinished.items() if k not in done or r.get("date", "") > done[k].get("date", "")}
    return done, unfinished, by_file


def _gb(mib: float) -> float:
    return mib * MIB / GB


def _cpu_s(r: dict) -> float | None:
    t = (r.get("user_s") or 0) + (r.get("sys_s") or 0)
    return t or None


def _find(done: dict[str, dict], size: str, method: str, flags: str = "", kind: str = "flexquant",
          gpu: bool = False) -> dict | None:
    return next((r for r in done.values() if r["kind"] == kind and r["size"] == size and r["method"] == method
                 and " ".join(r.get("flags") or []) == flags and bool(r.get("report_peak_device_mb")) == gpu), None)


def newest_depth_pairs(by_file: dict[str, list[dict]]) -> list[dict]:
    """The newest depth pair per (pair, kind, method, flags), both rows run by the same code (commit)."""
    from bench.scale import depth_summary
    from bench.synth import DEPTH_PAIRS

    by_code: dict[str, list[dict]] = {}
    for rows in by_file.values():
        for r in rows:
            by_code.setdefault(r.get("code") or "?", []).append(r)
    newest: dict[tuple, dict] = {}
    for rows in by_code.values():
        rows = sorted(rows, key=lambda r: r.get("date", ""))  # the newest of a key wins below
        dated = {(r["size"], r["kind"], r["method"], tuple(r["flags"])): r for r in rows}
        for d in depth_summary(rows, DEPTH_PAIRS + WIDE_PAIRS):
            flags = tuple(d["flags"])
            a, b = dated[(d["short"], d["kind"], d["method"], flags)], dated[(d["deep"], d["kind"], d["method"], flags)]
            d = {**d, "file": ", ".join(sorted({a["file"], b["file"]})), "code": b.get("code"),
                 "date": max(a.get("date", ""), b.get("date", ""))}
            key = (d["short"], d["deep"], d["kind"], d["method"], flags)
            if d["date"] >= newest.get(key, {}).get("date", ""):
                newest[key] = d
    return list(newest.values())


def _bar(name: str, measured: str, ok: bool | None, source: str) -> dict:
    return {"bar": name, "measured": measured, "met": ok, "source": source}


def _row_bar(done: dict, size: str, flags: str, limit_gb: float) -> dict:
    name = f"GPTQ on the {size} model{' with ' + flags if flags else ' (defaults)'}: peak < {limit_gb:g} GB"
    r = _find(done, size, "gptq", flags)
    if r is None:
        return _bar(name, "not measured", None, "—")
    gb = _gb(r["peak_rss_mib"])
    return _bar(name, f"{r['peak_rss_mib']:.0f} MiB = {gb:.2f} GB", gb < limit_gb, f"{r['file']} ({r.get('code')})")


def _smollm2_bar(results: Path) -> dict:
    name = (f"FlexibleLLM 3.5 on smollm2-135m: peak ≤ 1.5 GB, perplexity within ±0.5% of {SMOLLM2_PPL}")
    f = results / "scale_smollm2_flex.json"
    if not f.is_file():
        return _bar(name, "not measured", None, "—")
    d = json.loads(f.read_text())
    mib, ppl = d["summary"]["peak_rss_mb"], d["eval"]["perplexity"]
    rel = ppl / SMOLLM2_PPL - 1
    return _bar(name, f"{mib:.0f} MiB = {_gb(mib):.2f} GB; perplexity {ppl:.3f} ({rel:+.2%})",
                _gb(mib) <= 1.5 and abs(rel) <= 0.005, f"{f.name} ({d.get('code')})")


def _peer_bar(done: dict) -> dict:
    name = "llm-compressor GPTQ on the 0.5b model: flexquant's peak ≤ 0.5 × the peer's"
    ours, peer = _find(done, "0.5b", "gptq"), _find(done, "0.5b", "llmc-gptq", kind="peer")
    if ours is None or peer is None:
        return _bar(name, "not measured", None, "—")
    ratio = ours["peak_rss_mib"] / peer["peak_rss_mib"]
    return _bar(name, f"{ours['peak_rss_mib']:.0f} vs {peer['peak_rss_mib']:.0f} MiB: {ratio:.2f} ×", ratio <= 0.5,
                f"{ours['file']} ({ours.get('code')}), {peer['file']} ({peer.get('code')})")


def _distributed_bar(by_file: dict[str, list[dict]]) -> dict:
    name = "2 ranks vs 1 (gloo) on the 0.5b model: the same checkpoint; time ratio and all-reduce volume reported"
    pairs = []
    for fname, rows in by_file.items():
        for r in rows:
            one = next((o for o in rows if o["kind"] == "flexquant" and o["size"] == r["size"]
                        and o["method"] == r["method"] and o["flags"] == r["flags"]), None)
            if r["kind"] == "distributed" and one is not None:
                pairs.append((r.get("date", ""), fname, r, one))
    if not pairs:
        return _bar(name, "not measured", None, "—")
    _, fname, r, one = max(pairs, key=lambda p: p[0])
    same = r.get("tensors_sha256") is not None and r.get("tensors_sha256") == one.get("tensors_sha256")
    from bench.scale import fmt_bytes

    d = r.get("distributed") or {}
    return _bar(name, f"{r['size']}: tensors {'identical' if same else 'DIFFERENT'}; wall {r['wall_s']:.0f} / "
                f"{one['wall_s']:.0f} s = {r['wall_s'] / one['wall_s']:.2f}"
                + (f"; per block: all-reduced {fmt_bytes(d.get('allreduce_bytes_per_block'))}, broadcast "
                   f"{fmt_bytes(d.get('broadcast_bytes_per_block'))}" if d else ""), same, f"{fname} ({r.get('code')})")


def _gpu_bar(done: dict) -> dict:
    name = "When a GPU is lent: the 1.1b model on one GPU, with the device peak"
    r = _find(done, "1.1b", "gptq", gpu=True)
    if r is None:
        return _bar(name, "not measured (no device lent)", None, "—")
    return _bar(name, f"device peak {r['report_peak_device_mb']:.0f} MiB, host {r['peak_rss_mib']:.0f} MiB, "
                f"{r['wall_s']:.0f} s wall", True, f"{r['file']} ({r.get('code')})")


def _model_bar(results: Path) -> dict:
    from bench.memory_model import validation

    errs = [float(line.split("|")[7].strip().rstrip("%")) for line in validation(results)[2:]]
    if not errs:
        return _bar("Memory model within 15% of every newest CPU row", "no rows", None, "—")
    return _bar("Memory model within 15% of every newest CPU row",
                f"{len(errs)} rows, {min(errs):+.1f}% … {max(errs):+.1f}%", max(map(abs, errs)) <= 15,
                "python -m bench.memory_model")


def bars(results: Path, done: dict, by_file: dict, pairs: list[dict]) -> list[dict]:
    out = [_bar(f"Depth: {d['short']} → {d['deep']} ({d['layers'][0]} → {d['layers'][1]} layers), {d['label']}"
                f"{' ' + ' '.join(d['flags']) if d['flags'] else ''}: peak +< 10%",
                f"{d['peak_rss_mib'][0]:.0f} → {d['peak_rss_mib'][1]:.0f} MiB ({d['rss_ratio'] - 1:+.1%})",
                d["rss_ratio"] < 1.10, f"{d['file']} ({d['code']})")
           for d in sorted(pairs, key=lambda d: (d["label"], d["flags"], d["layers"]))]
    out += [_row_bar(done, "2b", "", 1.5), _row_bar(done, "2b", "--max-memory 512MB", 1.0), _smollm2_bar(results),
            _peer_bar(done), _distributed_bar(by_file), _gpu_bar(done), _model_bar(results)]
    return out


def grid(done: dict, unfinished: dict) -> list[str]:
    """Each main size × method: its newest finished CPU rows, or what stopped short."""
    from bench.synth import MAIN_SIZES

    lines = []
    for size in MAIN_SIZES:
        for method in GRID_METHODS:
            rows = [r for r in done.values() if r["kind"] == "flexquant" and r["size"] == size
                    and r["method"] == method and not r.get("report_peak_device_mb")]
            if rows:
                continue
            part = [r for r in unfinished.values() if r["size"] == size and r["method"] == method]
            why = "; ".join(f"{r.get('status')} ({r['file']}, {r.get('code')}: peak so far "
                            f"{r.get('peak_rss_mib') or 0:.0f} MiB after {r.get('wall_s') or 0:.0f} s"
                            + (f", {r['blocks_finished']} of {r['layers']} blocks written"
                               if "blocks_finished" in r else "") + ")" for r in part)
            lines.append(f"- {size} {method}: no finished CPU row{': ' + why if why else ''}")
    return lines


def rows_table(rows: list[dict]) -> list[str]:
    from bench.scale import fmt_bytes, fmt_params, row_name

    lines = ["| model | params | layers | method | flags | device | peak RSS (MiB) | device peak (MiB) | wall s | "
             "CPU s | store bytes | bpw | code | date | file |", "|" + "---|" * 15]
    order = {s: i for i, s in enumerate(("tiny", "w512-l6", "0.1b", "w1024-l12", "0.5b", "w2048-l2", "w2048-l4",
                                         "1.1b", "2b"))}
    for r in sorted(rows, key=lambda r: (order.get(r["size"], 99), r["kind"], r["method"], r["flags"])):
        cpu, dev = _cpu_s(r), r.get("report_peak_device_mb")
        bpw = f"{r['bpw']:.3f}" if isinstance(r.get("bpw"), (int, float)) else "—"
        lines.append(f"| {r['size']} | {fmt_params(r['params'])} | {r['layers']} | {row_name(r)} | "
                     f"{' '.join(r['flags']) or '—'} | {'GPU' if dev else 'CPU'} | {r['peak_rss_mib']:.0f} | "
                     f"{f'{dev:.0f}' if dev else '—'} | {r['wall_s']:.0f} | {f'{cpu:.0f}' if cpu else '—'} | "
                     f"{fmt_bytes(r.get('store_bytes'))} | {bpw} | {r.get('code', '?')} | {r.get('date', '')[:10]} | "
                     f"{r['file']} |")
    return lines


def write(results: Path) -> str:
    done, unfinished, by_file = collect(results)
    pairs = newest_depth_pairs(by_file)
    checks = bars(results, done, by_file, pairs)
    verdict = {True: "met", False: "**not met**", None: "not measured"}
    md = ["# Scaling benchmark: the newest row of every run", "",
          "Generated by `python -m bench.scale_summary` from the committed `bench/results/scale_*.json` (each the "
          "output of one `python -m bench.scale` run; its header there says how it was measured). Peak RSS is the "
          "quantizing process's VmHWM; CPU s is user + sys; GB are decimal. Rows from different runs shared the 2 "
          "CPU cores with different loads: compare wall times only within one file.", "",
          "## The bars", "", "| bar | measured | verdict | source (code) |", "|---|---|---|---|"]
    md += [f"| {b['bar']} | {b['measured']} | {verdict[b['met']]} | {b['source']} |" for b in checks]
    missing = grid(done, unfinished)
    md += ["", "## Sizes × methods not finished", "", *(missing or ["- none"]), "",
           "## The newest finished row of each run", "", *rows_table(list(done.values())), ""]
    text = "\n".join(md)
    (results / "scale.md").write_text(text)
    (results / "scale.json").write_text(json.dumps({"bars": checks, "missing": missing, "depth": pairs,
                                                    "rows": sorted(done.values(), key=_key)}, indent=1) + "\n")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "bench/results",
                    help="folder of bench.scale's scale_*.json")
    print(write(ap.parse_args(argv).results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scaling benchmark (issue 21): peak memory, time and offload-store size of `flexquant quantize` as the
model grows, on synthetic Llama-shaped models (bench/synth.py: random float16 weights, sharded).

    python -m bench.scale                                   # every size, gptq + flexible, peer, distributed
    python -m bench.scale --sizes 0.1b --methods gptq --no-depth --peer-sizes "" --distributed-sizes ""
    python -m bench.scale --flags "" "--max-memory 512MB"   # each row twice: plain, and with extra flags
    python -m bench.scale --dry-run                         # print the planned commands only

Each row quantizes one model in its own SUBPROCESS:

* ``flexquant``: ``python -m flexquant quantize MODEL --method M ... --nsamples 32 --seqlen 512 --out OUT``
  (the embedded pydoc calibration text, seed 0); methods ``gptq`` (4 bits, group 128) and
  ``flexible`` (``--bpw 3.5``).  When the CLI has ``--offload-dir`` (``--offload auto``), each run gets
  its own store folder.
* ``peer``: llm-compressor GPTQ (w4 g128, asymmetric, lm_head kept) through bench/peers.py in
  .venv-peers with ``--measure-only`` (no dequantized save / check), calibrated on exactly the same
  token ids, written to a token file with flexquant's calibration_windows like bench/foundation.py.
  peers.py loads the model in ``--peer-dtype`` (default float32, its validated path).
* ``distributed``: ``torchrun --nproc-per-node 2 -m flexquant quantize ...`` (gptq); skipped with a
  message when flexquant has no torchrun support yet, or when the run fails.

Measured per row: peak RSS = ``ru_maxrss`` of ``os.wait4`` on the child (its VmHWM; for a process tree,
the largest single process, not the sum), plus the sampled peak of the summed RSS of the whole process
tree (every --interval s: what torchrun's ranks hold together); wall time of the subprocess (model
loading and saving included); store bytes: the ``store`` entry of the checkpoint's report.json when
present, else the sampled peak size of the offload folder; bpw from the report.

Finished rows are kept in bench/results/work/scale/rows.json (rerunning skips them; ``--fresh`` redoes
them: the key is the row, not the code, so pass it after src/ changes; each row records the commit it
ran, ``code`` in the results); failed and skipped rows are retried on the next run.  Results:
bench/results/NAME.md (table, depth-independence lines) and NAME.json (``--name``, default scale_run); then
bench.scale_summary gathers the newest row of every committed scale_*.json and checks issue 21's bars in
bench/results/scale.md.  The depth pairs
(bench.synth.DEPTH_PAIRS: the same width at L and 2L layers) give, per method, the peak-RSS ratio
2L / L: with layer-by-layer streaming it should stay near 1 while the weights grow ~1.3-1.6x.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.scale")

METHODS = {  # name -> (label, flexquant quantize flags)
    "gptq": ("gptq w4 g128", ["--method", "gptq", "--bits", "4", "--group-size", "128"]),
    "flexible": ("flexible 3.5 bpw", ["--method", "flexible", "--bpw", "3.5"]),
    "hiratio": ("hiratio 2.5 bpw", ["--method", "hiratio", "--bpw", "2.5"]),
}
PEERS = {"llmc-gptq": ("llm-compressor gptq w4 g128", ["--bits", "4", "--group-size", "128"])}
KINDS = ("flexquant", "peer", "distributed")


# ---------------------------------------------------------------------------------------------- commands

def flexquant_module() -> str:
    """``flexquant`` once the package has a __main__, else the CLI package (the same command)."""
    return "flexquant" if importlib.util.find_spec("flexquant.__main__") else "flexquant.cli"


def quantize_help() -> str:
    proc = subprocess.run([sys.executable, "-m", flexquant_module(), "quantize", "--help"],
                          capture_output=True, text=True, cwd=ROOT)
    return proc.stdout


def has_torchrun_support() -> bool:
    """Whether the flexquant package source sets up torch.distributed at all (a cheap text probe)."""
    spec = importlib.util.find_spec("flexquant")
    pkg = Path(spec.origin).parent
    pat = re.compile(r"init_process_group|WORLD_SIZE|LOCAL_RANK")
    return any(pat.search(f.read_text(errors="ignore")) for f in pkg.rglob("*.py"))


def code_version() -> str:
    """The commit the runs use, '+dirty' when src/ has uncommitted changes (recorded per row, not keyed)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True,
                               cwd=ROOT)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def row_key(row: dict) -> str:
    return f"{row['kind']}|{row['size']}|{row['method']}|{' '.join(row['flags'])}|{row['nsamples']}x{row['seqlen']}"


def slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", key).strip("-")[:120]


def plan(args) -> list[dict]:
    """The rows to run, smallest model first."""
    from bench.synth import DEPTH_PAIRS, SIZES

    sizes = [s for s in args.sizes.split(",") if s]
    if args.depth:
        sizes += [s for pair in DEPTH_PAIRS for s in pair]
    sizes = sorted(dict.fromkeys(sizes), key=lambda s: SIZES[s].params)
    base = {"nsamples": args.nsamples, "seqlen": args.seqlen}
    rows = []
    for size in sizes:
        for method in [m for m in args.methods.split(",") if m]:
            for flags in args.flags:
                rows.append({"kind": "flexquant", "size": size, "method": method, "flags": shlex.split(flags), **base})
    for size in [s for s in args.peer_sizes.split(",") if s]:
        rows.append({"kind": "peer", "size": size, "method": "llmc-gptq", "flags": [], **base})
    for size in [s for s in args.distributed_sizes.split(",") if s]:
        for flags in args.flags:
            rows.append({"kind": "distributed", "size": size, "method": "gptq", "flags": shlex.split(flags), **base})
    for r in rows:
        if r["size"] not in SIZES:
            raise SystemExit(f"scale.py: error: unknown size {r['size']!r} (bench.synth sizes: {', '.join(SIZES)})")
        if r["kind"] != "peer" and r["method"] not in METHODS:
            raise SystemExit(f"scale.py: error: unknown method {r['method']!r} ({', '.join(METHODS)})")
    return rows


def command(row: dict, model: Path, out: Path, store: Path | None, calib: Path | None, args) -> list[str]:
    if row["kind"] == "peer":
        return [str(ROOT / ".venv-peers/bin/python"), str(ROOT / "bench/peers.py"), row["method"], "--model",
                str(model), "--calib", str(calib), *PEERS[row["method"]][1], "--out", str(out), "--measure-only",
                "--dtype", args.peer_dtype, *row["flags"]]
    launcher = [sys.executable, "-m", flexquant_module()]
    if row["kind"] == "distributed":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                    "-m", flexquant_module()]
    cmd = [*launcher, "quantize", str(model), *METHODS[row["method"]][1], "--nsamples", str(row["nsamples"]),
           "--seqlen", str(row["seqlen"]), "--device", args.device, "--out", str(out), "--overwrite", "-q"]
    if store is not None:
        cmd += ["--offload-dir", str(store)]
    return cmd + row["flags"]


# ------------------------------------------------------------------------------------------- measurement

def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:  # removed while walking
                pass
    return total


def tree_rss_kib(pid: int) -> int:
    """Summed VmRSS of pid and all its descendants (via /proc/PID/task/TID/children)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


class Sampler(threading.Thread):
    """Every `interval` s: the summed RSS of the process tree and the size of the store folder (peaks)."""

    def __init__(self, pid: int, store: Path | None, interval: float):
        super().__init__(daemon=True)
        self.pid, self.store, self.interval = pid, store, interval
        self.tree_kib = self.store_bytes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.tree_kib = max(self.tree_kib, tree_rss_kib(self.pid))
            if self.store is not None and self.store.exists():
                self.store_bytes = max(self.store_bytes, dir_bytes(self.store))
            self.stop.wait(self.interval)


def measure(cmd: list[str], logfile: Path, store: Path | None, interval: float, timeout: float | None,
            env: dict | None = None) -> dict:
    """Run cmd (own session, output to logfile); its rc, wall time, ru_maxrss and the sampled peaks."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as lf:
        lf.write("$ " + shlex.join(cmd) + "\n")
        lf.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        sampler = Sampler(proc.pid, store, interval)
        sampler.start()
        timer, fired = None, threading.Event()

        def stop():
            fired.set()
            os.killpg(proc.pid, signal.SIGKILL)

        if timeout:
            timer = threading.Timer(timeout, stop)
            timer.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        if timer:
            timer.cancel()
        sampler.stop.set()
        sampler.join()
    return {"rc": proc.returncode, "timed_out": fired.is_set(), "wall_s": wall, "peak_rss_mib": ru.ru_maxrss / 1024,
            "tree_rss_peak_mib": sampler.tree_kib / 1024, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
            "store_sampled_peak_bytes": sampler.store_bytes if store is not None else None}


def store_from_report(rep: dict) -> tuple[object, int | None]:
    """The report's activation-store record (``memory.store``) and its bytes on disk at peak."""
    raw = (rep.get("memory") or {}).get("store")
    if isinstance(raw, dict) and isinstance(raw.get("peak_disk_bytes"), (int, float)):
        return raw, int(raw["peak_disk_bytes"])
    return raw, None


def tail(logfile: Path, n: int = 3) -> list[str]:
    lines = [ln for ln in logfile.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-n:]


def run_row(row: dict, model: Path, calib: Path | None, work: Path, args, offload: bool) -> dict:
    from bench.synth import SIZES

    shape = SIZES[row["size"]]
    name = slug(row_key(row))
    out, store = work / "out" / name, (work / "store" / name if offload and row["kind"] != "peer" else None)
    for d in (out, store):
        if d is not None and d.exists():
            shutil.rmtree(d)
    if store is not None:
        store.parent.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(row, model, out, store, calib, args)
    res = {**row, "key": row_key(row), "params": shape.params, "layers": shape.layers, "hidden": shape.hidden,
           "intermediate": shape.intermediate, "fp16_bytes": shape.fp16_bytes,
           "label": PEERS[row["method"]][0] if row["kind"] == "peer" else METHODS[row["method"]][0],
           "cmd": shlex.join(cmd), "log": str(work / "logs" / f"{name}.log"),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "code": code_version()}
    log.info("running %s", res["key"])
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    res.update(measure(cmd, Path(res["log"]), store, args.interval, args.timeout, env))
    partial = out.parent / f".{out.name}.partial"  # a stopped run's finished blocks (flexquant --resume)
    if res["rc"] != 0 and res.pop("timed_out", False):
        res["status"] = "stopped"
        res["blocks_finished"] = _blocks_finished(partial)
        res["error"] = [f"stopped by --timeout {args.timeout:g} s after {res['blocks_finished']} of "
                        f"{shape.layers} blocks"]
        log.warning("%s stopped: %s (peak RSS so far %.0f MiB)", res["key"], res["error"][0], res["peak_rss_mib"])
    elif res["rc"] != 0:
        res["status"] = "skipped" if row["kind"] == "distributed" else "failed"
        res["error"] = tail(Path(res["log"]))
        if row["kind"] == "distributed":
            res["error"] = ["torchrun run failed (distributed support missing or broken?): "
                            + " / ".join(res["error"])]
        log.error("%s %s (rc %s): %s", res["key"], res["status"], res["rc"], " | ".join(res["error"]))
    else:
        res["status"] = "ok"
        rep_file = out / ("peer_report.json" if row["kind"] == "peer" else "report.json")
        rep = json.loads(rep_file.read_text()) if rep_file.is_file() else {}
        summ = rep.get("summary", rep)
        res["bpw"] = summ.get("bpw")
        res["report_quant_seconds"] = summ.get("quant_seconds", summ.get("quant_time_s"))
        res["report_peak_rss_mb"] = summ.get("peak_rss_mb")
        res["report_peak_device_mb"] = summ.get("peak_device_mb")
        res["store_report"], res["store_report_bytes"] = store_from_report(rep)
        if store is not None and store.exists():
            res["store_final_bytes"] = dir_bytes(store)
        from flexquant.tensorio import tensors_digest

        res["tensors_sha256"] = (tensors_digest(out) if row["kind"] != "peer" and any(out.glob("*.safetensors"))
                                 else None)
        dist = rep.get("distributed") or {}
        if dist:
            blocks = [n for n in rep.get("blocks", []) if isinstance(n, dict) and "allreduce_bytes" in n]
            res["distributed"] = {**dist, "blocks": len(blocks),
                                  "allreduce_bytes_per_block": (sum(n["allreduce_bytes"] for n in blocks) / len(blocks)
                                                                if blocks else None),
                                  "broadcast_bytes_per_block": (sum(n.get("broadcast_bytes", 0) for n in blocks)
                                                                / len(blocks) if blocks else None)}
        if rep_file.is_file():
            (work / "reports").mkdir(exist_ok=True)
            shutil.copy2(rep_file, work / "reports" / f"{name}.json")
        log.info("%s: peak RSS %.0f MiB, %.0f s, bpw %s", res["key"], res["peak_rss_mib"], res["wall_s"], res["bpw"])
    res["store_bytes"] = next((res.get(k) for k in ("store_report_bytes", "store_sampled_peak_bytes")
                               if res.get(k)), None)
    res.pop("timed_out", None)
    if not args.keep:
        for d in (out, store, partial):
            if d is not None and d.exists():
                shutil.rmtree(d, ignore_errors=True)
    return res


def _blocks_finished(partial: Path) -> int:
    """How many decoder blocks a stopped flexquant run had written (its partial folder's progress file)."""
    from flexquant.format.checkpoint import PROGRESS

    try:
        return int(json.loads((partial / PROGRESS).read_text())["blocks"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def skipped_row(row: dict, why: str) -> dict:
    from bench.synth import SIZES

    shape = SIZES[row["size"]]
    return {**row, "key": row_key(row), "params": shape.params, "layers": shape.layers, "hidden": shape.hidden,
            "label": METHODS.get(row["method"], PEERS.get(row["method"], (row["method"],)))[0],
            "status": "skipped", "error": [why]}


def write_calib(model: Path, path: Path, nsamples: int, seqlen: int) -> Path:
    """The calibration token ids `flexquant quantize --calib pydoc --seed 0` draws, for the peer."""
    if path.is_file():
        return path
    from safetensors.torch import save_file

    from flexquant.data import calibration_windows
    from flexquant.models import load_tokenizer

    ids = calibration_windows(load_tokenizer(str(model)), "pydoc", nsamples, seqlen, seed=0)
    tmp = path.with_suffix(".tmp")
    save_file({"input_ids": ids.contiguous()}, tmp)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------- results

def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def fmt_bytes(n) -> str:
    if n is None:
        return "—"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{int(n)} B"


def row_name(r: dict) -> str:
    return {"flexquant": "flexquant", "peer": "peer", "distributed": f"flexquant torchrun×{r.get('nproc', 2)}"}[
        r["kind"]] + " " + r["label"]


def table(rows: list[dict]) -> str:
    """One line per row; a "device peak" column (the CUDA allocator's peak) when any row ran on a GPU."""
    gpu = any(r.get("report_peak_device_mb") for r in rows)
    lines = ["| model | params | layers | method | flags | peak RSS (MiB) | tree RSS (MiB) | "
             + ("device peak (MiB) | " if gpu else "") + "time (s) | store bytes | bpw |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for r in rows:
        head = (f"| {r['size']} | {fmt_params(r['params'])} | {r['layers']} | {row_name(r)} | "
                f"{' '.join(r['flags']) or '—'} |")
        if r.get("status") != "ok":
            why = "; ".join(r.get("error") or []).replace("|", "\\|")[:300]
            lines.append(f"{head} {r.get('status', 'failed')}: {why} | | | | |" + (" |" if gpu else ""))
            continue
        tree = f"{r['tree_rss_peak_mib']:.0f}" if r.get("tree_rss_peak_mib") else "—"
        bpw = f"{r['bpw']:.3f}" if isinstance(r.get("bpw"), (int, float)) else "—"
        dev = (f" {r['report_peak_device_mb']:.0f} |" if r.get("report_peak_device_mb") else " — |") if gpu else ""
        lines.append(f"{head} {r['peak_rss_mib']:.0f} | {tree} |{dev} {r['wall_s']:.0f} | "
                     f"{fmt_bytes(r.get('store_bytes'))} | {bpw} |")
    return "\n".join(lines)


def depth_summary(rows: list[dict], pairs: tuple | None = None) -> list[dict]:
    """Per depth pair (default bench.synth.DEPTH_PAIRS) and (kind, method, flags): peak RSS of 2L over L, when
    both rows are done."""
    from bench.synth import DEPTH_PAIRS, SIZES

    ok = {(r["size"], r["kind"], r["method"], tuple(r["flags"])): r for r in rows if r.get("status") == "ok"}
    out = []
    for short, deep in pairs or DEPTH_PAIRS:
        for (size, kind, method, flags), a in ok.items():
            b = ok.get((deep, kind, method, flags))
            if size != short or b is None:
                continue
            out.append({"short": short, "deep": deep, "layers": [a["layers"], b["layers"]], "kind": kind,
                        "method": method, "label": row_name(a), "flags": list(flags),
                        "peak_rss_mib": [a["peak_rss_mib"], b["peak_rss_mib"]],
                        "rss_ratio": b["peak_rss_mib"] / a["peak_rss_mib"],
                        "weights_ratio": SIZES[deep].params / SIZES[short].params})
    return out


def depth_lines(summary: list[dict]) -> list[str]:
    return [f"- depth {d['short']} → {d['deep']} ({d['layers'][0]} → {d['layers'][1]} layers), {d['label']}"
            f"{' ' + ' '.join(d['flags']) if d['flags'] else ''}: peak RSS {d['peak_rss_mib'][0]:.0f} → "
            f"{d['peak_rss_mib'][1]:.0f} MiB, ratio **{d['rss_ratio']:.2f}** (weights ×{d['weights_ratio']:.2f})"
            for d in summary]


def distributed_lines(rows: list[dict]) -> list[str]:
    """Per torchrun row: whether its tensors equal the one-process row's, the time ratio, the collective volume."""
    ok = {(r["size"], r["method"], tuple(r["flags"])): r for r in rows
          if r.get("status") == "ok" and r["kind"] == "flexquant"}
    out = []
    for r in rows:
        if r["kind"] != "distributed" or r.get("status") != "ok":
            continue
        one = ok.get((r["size"], r["method"], tuple(r["flags"])))
        d = r.get("distributed") or {}
        vol = (f"; all-reduced {fmt_bytes(d.get('allreduce_bytes_total'))} in all "
               f"({fmt_bytes(d.get('allreduce_bytes_statistics_pass'))} in the statistics pass, "
               f"{fmt_bytes(d.get('allreduce_bytes_per_block'))} per block), broadcast "
               f"{fmt_bytes(d.get('broadcast_bytes_total'))} ({fmt_bytes(d.get('broadcast_bytes_per_block'))} "
               "per block), rank 0's payload" if d else "")
        if one is None:
            out.append(f"- {r['size']} {row_name(r)}: no one-process row to compare{vol}")
            continue
        same = (r.get("tensors_sha256") is not None and r.get("tensors_sha256") == one.get("tensors_sha256"))
        out.append(f"- {r['size']} {row_name(r)} vs one process: tensors **{'identical' if same else 'DIFFERENT'}** "
                   f"(sha256 {str(r.get('tensors_sha256'))[:12]} vs {str(one.get('tensors_sha256'))[:12]}); wall "
                   f"{r['wall_s']:.0f} s vs {one['wall_s']:.0f} s (ratio {r['wall_s'] / one['wall_s']:.2f}); peak RSS "
                   f"per process {r['peak_rss_mib']:.0f} vs {one['peak_rss_mib']:.0f} MiB, whole tree "
                   f"{r.get('tree_rss_peak_mib') or 0:.0f} MiB{vol}")
    return out


def write_results(rows: list[dict], args, out_dir: Path) -> str:
    summary = depth_summary(rows)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    header = (f"Synthetic Llama-shaped models (bench/synth.py: random N(0, 0.02) float16 weights, vocabulary 49152, "
              f"untied lm_head), calibration {args.nsamples}×{args.seqlen} tokens of the embedded pydoc text "
              f"(seed 0), device {args.device}, {machine['cpus']} CPUs. Peak RSS: ru_maxrss of the quantizing "
              "process (os.wait4; for torchrun the largest single process); tree RSS: sampled peak of the "
              f"summed RSS of its process tree (every {args.interval:g} s); time: the subprocess's wall time "
              "(loading and saving included); store bytes: the report's `store` entry, else the sampled peak "
              "size of --offload-dir (— without one). Peer: llm-compressor through bench/peers.py "
              f"--measure-only, model loaded in {args.peer_dtype}.")
    md = [f"# Scaling benchmark ({dt.date.today().isoformat()})", "", header, "", table(rows), ""]
    dist = distributed_lines(rows)
    if dist:
        md += ["Distributed vs one process (same size, method and flags; checkpoints compared tensor by tensor):",
               "", *dist, ""]
    if summary:
        md += ["Depth independence (same width, L vs 2L layers; peak RSS ratio 2L / L):", "", *depth_lines(summary), ""]
    text = "\n".join(md)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.md").write_text(text)
    (out_dir / f"{args.name}.json").write_text(json.dumps(
        {"header": header, "machine": machine, "rows": rows, "depth": summary}, indent=1) + "\n")
    return text


# ------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    from bench.synth import MAIN_SIZES, SIZES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(MAIN_SIZES), help=f"bench.synth sizes ({', '.join(SIZES)})")
    p.add_argument("--no-depth", dest="depth", action="store_false",
                   help="leave out the depth-pair models (bench.synth.DEPTH_PAIRS)")
    p.add_argument("--methods", default="gptq,flexible", help=f"flexquant methods ({', '.join(METHODS)})")
    p.add_argument("--flags", nargs="*", default=[""],
                   help="extra flag sets, one row per set and size/method, e.g. \"\" \"--max-memory 512MB\"")
    p.add_argument("--peer-sizes", default="0.5b", help="sizes of the llm-compressor GPTQ row ('' for none)")
    p.add_argument("--peer-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--distributed-sizes", default="0.5b", help="sizes of the torchrun gptq row ('' for none)")
    p.add_argument("--nproc", type=int, default=2, help="torchrun --nproc-per-node")
    p.add_argument("--offload", choices=("auto", "on", "off"), default="auto",
                   help="pass --offload-dir (auto: when `quantize --help` lists it)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the runs (0: inherit)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between RSS / store samples")
    p.add_argument("--timeout", type=float, default=None, help="kill a row after this many seconds")
    p.add_argument("--models-dir", type=Path, default=ROOT / "bench/results/work/scale/models")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results")
    p.add_argument("--name", default="scale_run",
                   help="results file stem (scale_* so that bench.scale_summary and bench.memory_model read it)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and stores (default: deleted)")
    p.add_argument("--fresh", action="store_true", help="rerun rows kept in work/scale/rows.json")
    p.add_argument("--dry-run", action="store_true", help="print the planned rows and commands, run nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from bench.foundation import RowCache
    from bench.synth import ensure

    rows = plan(args)
    work = args.out / "work" / "scale"
    offload = args.offload == "on" or (args.offload == "auto" and "--offload-dir" in quantize_help())
    log.info("%d rows; --offload-dir %s", len(rows), "passed" if offload else "not passed")
    if args.dry_run:
        for r in rows:
            print(row_key(r))
            print("   ", shlex.join(command(r, args.models_dir / r["size"], work / "out" / slug(row_key(r)),
                                            work / "store" / slug(row_key(r)) if offload else None,
                                            work / f"calib-{args.nsamples}x{args.seqlen}.safetensors", args)))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    cache = RowCache(work, args.fresh)
    torchrun_ok = has_torchrun_support()
    done = []
    for row in rows:
        key = row_key(row)
        if (hit := cache.get(key)) is not None:
            log.info("kept: %s", key)
            done.append(hit)
            continue
        if row["kind"] == "peer" and not (ROOT / ".venv-peers/bin/python").exists():
            done.append(skipped_row(row, "no .venv-peers (bash bench/peers_env.sh)"))
            continue
        if row["kind"] == "distributed" and not torchrun_ok:
            why = ("flexquant has no torchrun support yet (no init_process_group / WORLD_SIZE in the package); "
                   "row skipped")
            log.warning("%s: %s", key, why)
            done.append(skipped_row(row, why))
            continue
        model = ensure(row["size"], args.models_dir)
        calib = (write_calib(model, work / f"calib-{args.nsamples}x{args.seqlen}.safetensors", args.nsamples,
                             args.seqlen) if row["kind"] == "peer" else None)
        res = run_row(row, model, calib, work, args, offload)
        if row["kind"] == "distributed":
            res["nproc"] = args.nproc
        if res["status"] == "ok":
            cache.put(key, res)
        done.append(res)
        write_results(done, args, args.out)
    print(write_results(done, args, args.out))
    if args.name.startswith("scale_"):
        from bench.scale_summary import write

        write(args.out)
        log.info("summary of every run: %s", args.out / "scale.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

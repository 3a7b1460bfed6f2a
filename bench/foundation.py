"""Foundation benchmark: full precision, flexquant RTN/GPTQ and the peers, side by side on smollm2-135m (or
``--model gemma3-270m``).

Every method quantizes from the same float32 model with the same calibration windows (written once
to a safetensors file) and is evaluated in this process on the same held-out windows against the
same full-precision reference. Each quantization runs in its own subprocess so that its wall time
and peak resident memory are its own.

    python -m bench.foundation                       # all methods at 4, 3, 2 bits, group 64
    python -m bench.foundation --bits 3 --peers ""  # flexquant only, 3 bits

Peers run from the separate environment made by ``bash bench/peers_env.sh`` (.venv-peers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench")
KEEP_LOGPROBS_BYTES = 4 << 30  # reference log-probabilities kept in memory up to this size
# run-config keys of a `--flexible` row (`3.5:target=vllm,group_size=128`), not method options
GRID_KEYS = ("scale_bits", "zero_bits", "target", "act_order", "group_size", "clip")


def job(args) -> None:
    """Subprocess entry: one flexquant quantization from the shared calibration windows."""
    import flexquant as fq

    calib = load_file(args.calib)["input_ids"]
    options = json.loads(args.options)
    grid = {"group_size": args.group_size}
    grid.update({k: options.pop(k) for k in GRID_KEYS if k in options})  # grid settings, not method options
    qm = fq.quantize(args.model, method=args.method, bits=args.bits,
                     calib_ids=calib, nsamples=calib.shape[0], seqlen=calib.shape[1], progress=False,
                     options=options, **grid)
    fq.save(qm, args.out, overwrite=True)
    if grid.get("target", "flexquant") != "flexquant":
        export_for_target(qm, Path(args.out), grid["target"], calib[:2, :256])


def export_for_target(qm, path: Path, target: str, ids: torch.Tensor) -> None:
    """Export a ``--target`` checkpoint to its format (float16, what servers load), reload the export through
    flexquant's importer, and write ``PATH-export.json``: the export's bits per weight as its files store them and
    the largest logit difference against the quantized model."""
    import flexquant as fq
    from flexquant.quant.targets import get_target

    fmt, out = get_target(target).format, path.with_name(path.name + "-export")
    info = path.with_name(path.name + "-export.json")
    if fmt == "gguf":  # judged by llama.cpp (bench/gguf.py), not by flexquant's importer
        summary = fq.export(path, path.with_name(path.name + "-export.gguf"), fmt, overwrite=True)
        info.write_text(json.dumps(summary, indent=2) + "\n")
        return
    # GPTQModel reads an asymmetric v1 GPTQ checkpoint only when its own quantizer wrote it: gptq_v2 for it
    kw = {"gptq_format": "gptq_v2"} if target == "gptqmodel" else {}
    summary = fq.export(path, out, fmt, dtype="float16", overwrite=True, **kw)
    with torch.no_grad():
        ref = qm.model(ids).logits.float()
        got = fq.load(out).model(ids).logits.float()
    summary["max_dlogit_rel"] = float((got - ref).abs().max() / ref.abs().max())
    info.write_text(json.dumps(summary, indent=2) + "\n")


def parse_flexible(spec: str) -> dict:
    """'2.5' or '2.5:dosa=0,lfd=1,feedback_alpha=0.2,candidates=2/3/4/8' -> FlexibleConfig options."""
    bpw, _, rest = spec.partition(":")
    opts: dict = {"bpw": float(bpw)}
    for kv in filter(None, rest.split(",")):
        k, v = kv.split("=")
        if "/" in v:  # a list: candidates=2/3/4/5/6/8
            opts[k] = [int(b) for b in v.split("/")]
        elif v in ("0", "1"):
            opts[k] = v == "1"
        else:
            try:
                opts[k] = float(v) if "." in v else int(v)
            except ValueError:
                opts[k] = v
    return opts


def finished_run(out: Path, method: str, bits: int, group_size: int, options: dict, calib: Path) -> bool:
    """Whether ``out`` already holds this flexquant quantization, finished (checkpoints are written to a temporary
    folder and renamed, so a report means a whole checkpoint): same method, grid, options and calibration shape
    (the windows are drawn with a fixed seed from the shape). Lets a benchmark killed between quantization and
    evaluation resume."""
    import yaml

    rep, recipe = out / "report.json", out / "recipe.yaml"
    if not (rep.is_file() and recipe.is_file()):
        return False
    r = yaml.safe_load(recipe.read_text())
    if [r.get("nsamples"), r.get("seqlen")] != list(load_file(calib)["input_ids"].shape):
        return False
    opts = dict(options)
    grid = {"bits": bits, "group_size": group_size, **{k: opts.pop(k) for k in GRID_KEYS if k in opts}}
    return (r.get("method") == method and all(r["grid"].get(k, r.get(k)) == v for k, v in grid.items())
            and all(r.get("options", {}).get(k) == v for k, v in opts.items()))


def flexquant_job(out: Path, method: str, bits: int, options: dict, args, work: Path) -> subprocess.CompletedProcess:
    """One flexquant quantization into ``out`` through this module's job entry (a subprocess, so its wall time and
    peak memory are its own), or the finished one already there (``finished_run``)."""
    cmd = [sys.executable, "-m", "bench.foundation", "_job", "--model", args.model_dir, "--method", method,
           "--bits", str(bits), "--group-size", str(args.group_size), "--calib", str(work / "calib.safetensors"),
           "--out", str(out), "--options", json.dumps(options)]
    if finished_run(out, method, bits, args.group_size, options, work / "calib.safetensors"):
        log.info("reusing the finished quantization in %s", out)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    log.info("running %s", " ".join(cmd[1:4] + cmd[5:]))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def run_quantization(kind: str, method: str, bits: int, args, work: Path, options: dict | None = None) -> dict:
    tag = "" if not options else "-" + "-".join(f"{k}{v}" for k, v in options.items())
    out = work / f"{kind}-{method}-w{bits}g{args.group_size}{tag}"
    t0 = time.perf_counter()
    if kind == "flexquant":
        proc = flexquant_job(out, method, bits, options or {}, args, work)
    else:
        cmd = [str(ROOT / ".venv-peers/bin/python"), str(ROOT / "bench/peers.py"), method, "--model",
               args.model_dir, "--calib", str(work / "calib.safetensors"), "--bits", str(bits),
               "--group-size", str(args.group_size), "--out", str(out)]
        log.info("running %s", " ".join(cmd[1:4] + cmd[5:]))
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        log.error("%s %s w%d failed:\n%s", kind, method, bits, proc.stderr[-3000:])
        return {"kind": kind, "method": method, "bits": bits, "error": proc.stderr.strip().splitlines()[-1:]}
    if kind == "flexquant":
        rep = json.loads((out / "report.json").read_text())["summary"]
        info = {"bpw": rep["bpw"], "quant_seconds": rep["quant_seconds"], "peak_rss_mb": rep["peak_rss_mb"]}
    else:
        rep = json.loads((out / "peer_report.json").read_text())
        info = {"bpw": rep["bpw"], "quant_seconds": rep["quant_time_s"], "peak_rss_mb": rep["peak_rss_mb"],
                "versions": rep.get("versions")}
    row = {"kind": kind, "method": method, "bits": bits, "path": str(out), "job_wall_seconds": wall, **info}
    exported = out.with_name(out.name + "-export.json")
    if kind == "flexquant" and exported.is_file():
        row["export"] = json.loads(exported.read_text())
    if options:
        row["options"] = options
    return row


def reference_row(args, windows: torch.Tensor):
    """Full-precision log-probabilities on the windows (the KL reference) and the reference's row."""
    from flexquant.eval import reference_logprobs
    from flexquant.models import load_model

    ref_model, _ = load_model(args.model_dir)
    if ref_model.config.vocab_size * windows.numel() * 4 > KEEP_LOGPROBS_BYTES:
        # (gemma3's 262k vocabulary: 8 windows of log-probabilities would be 17 GB) the model stays the reference,
        # run again beside each evaluated model on the same windows
        from flexquant.eval import evaluate_windows

        res = evaluate_windows(ref_model, windows, progress=False)
        return ref_model, {"kind": "reference", "method": "full precision", "bits": 32, "bpw": 32.0,
                           "perplexity": res["perplexity"], "kl_divergence": 0.0}
    ref = reference_logprobs(ref_model, windows, progress=False)
    del ref_model
    nll = sum(float(-lp[0].gather(-1, windows[i, 1:, None]).sum()) for i, lp in enumerate(ref))
    row = {"kind": "reference", "method": "full precision", "bits": 32, "bpw": 32.0,
           "perplexity": math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))), "kl_divergence": 0.0}
    return ref, row


def evaluate_row(row: dict, windows: torch.Tensor, ref) -> None:
    import flexquant as fq
    from flexquant.eval import evaluate_windows
    from flexquant.models import load_model

    if "error" in row:
        return
    log.info("evaluating %s", row["path"])
    model = fq.load(row["path"]).model if row["kind"] == "flexquant" else load_model(row["path"])[0]
    res = evaluate_windows(model, windows, ref, progress=False)
    row.update(perplexity=res["perplexity"], kl_divergence=res["kl_divergence"])
    log.info("%s %s w%d: ppl %.3f KL %.4f", row["kind"], row["method"], row["bits"], res["perplexity"],
             res["kl_divergence"])


def table(rows: list[dict]) -> str:
    lines = ["| method | bits | bpw (stored) | perplexity | KL to FP | quant time (s) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["method"] if r["kind"] == "reference" else f"{r['kind']} {r['method']}"
        if r.get("options"):
            name += " " + " ".join(f"{k}={v}" for k, v in r["options"].items())
        if "error" in r:
            lines.append(f"| {name} | {r['bits']} | failed: {r['error']} | | | | |")
            continue
        t = f"{r['quant_seconds']:.0f}" if r.get("quant_seconds") is not None else "—"
        mem = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "—"
        if r.get("export"):  # a --target row: the bits as its exported files store them
            e = r["export"]
            fmt = e["format"] + (f" ({e['checkpoint_format']})" if e.get("checkpoint_format") else "")
            reload = f", reloaded max Δlogit {e['max_dlogit_rel']:.1e} of range" if "max_dlogit_rel" in e else ""
            name += f" (exported {fmt}: {e['bpw']:.3f} bpw{reload})"
        lines.append(f"| {name} | {r['bits']} | {r['bpw']:.3f} | {r['perplexity']:.3f} | "
                     f"{r['kl_divergence']:.4f} | {t} | {mem} |")
    return "\n".join(lines)


def work_dir(args) -> Path:
    """The benchmark's working folder (calibration windows, checkpoints, finished rows) for ``args.model``."""
    return Path(args.out) / ("work" if args.model == "smollm2-135m" else f"work-{Path(args.model).name}")


def setup(args, work: Path, text_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo model (into ``args.model_dir``), ``work`` created, the calibration windows written to
    work/calib.safetensors atomically (a running job may read it), and ``text_windows`` held-out windows."""
    from flexquant.data import calibration_windows, eval_windows
    from flexquant.models import load_tokenizer
    from flexquant.models.builtin import builtin_path

    args.model_dir = str(builtin_path(args.model) or args.model)
    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(args.model_dir)
    calib = calibration_windows(tok, "pydoc", args.nsamples, args.seqlen, seed=0)
    save_file({"input_ids": calib.contiguous()}, work / "calib.tmp")
    (work / "calib.tmp").replace(work / "calib.safetensors")
    return calib, eval_windows(tok, "pydoc", 2048, text_windows)


class RowCache:
    """Finished (quantized + evaluated) rows in work/rows.json, keyed by run and windows, so an interrupted
    benchmark resumes; every write merges rows another invocation finished meanwhile, atomically."""

    def __init__(self, work: Path, fresh: bool):
        self.path = work / "rows.json"
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.rows = {} if fresh else old
        self.stale = old if fresh else {}  # with --fresh, rows on disk at the start: a merge must not bring them back

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict) -> None:
        if self.path.exists():
            self.rows.update({k: v for k, v in json.loads(self.path.read_text()).items()
                              if k not in self.rows and self.stale.get(k) != v})
        self.rows[key] = row
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows, indent=1))
        tmp.replace(self.path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="built-in model name (smollm2-135m, gemma3-270m) or folder")
    p.add_argument("--bits", type=int, nargs="*", default=[4, 3, 2])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--methods", default="rtn,gptq", help="flexquant methods")
    p.add_argument("--peers", default="llmc-gptq,hqq", help="peer methods (bench/peers.py); '' for none")
    p.add_argument("--flexible", nargs="*", default=[],
                   help="FlexibleLLM runs: BPW[:key=value,...], e.g. 2.5 3.5:dosa=0")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=8, help="evaluation windows of 2048 tokens")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    p.add_argument("--name", default="foundation")
    p.add_argument("--fresh", action="store_true", help="ignore finished runs kept in OUT/work/rows.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    work = work_dir(args)
    calib, windows = setup(args, work, args.windows)
    peers = [m for m in args.peers.split(",") if m]
    if peers and not (ROOT / ".venv-peers/bin/python").exists():
        sys.exit("the peers' environment is missing: run `bash bench/peers_env.sh` first (or pass --peers '')")
    cache = RowCache(work, args.fresh)
    setting = f"calib{args.nsamples}x{args.seqlen}-eval{windows.shape[0]}"
    ref, fp_row = reference_row(args, windows)
    rows = [fp_row]
    header = (f"{args.model}, calibration {args.nsamples}×{args.seqlen} tokens of the pydoc calibration split, "
              f"evaluation {windows.shape[0]} windows × 2048 tokens of the held-out split; group size "
              f"{args.group_size}; {dt.date.today()}, {platform.machine()} with {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"ATen {torch.backends.cpu.get_cpu_capability()}")

    def run(kind: str, method: str, bits: int, options: dict | None = None) -> None:
        key = f"{setting}:{kind}:{method}:{bits}:{json.dumps(options or {}, sort_keys=True)}"
        row = cache.get(key)
        if row is not None:
            log.info("reusing %s", key)
        else:
            row = run_quantization(kind, method, bits, args, work, options)
            evaluate_row(row, windows, ref)
            if "error" not in row:
                cache.put(key, row)
        rows.append(row)
        write(args, header, rows)

    for bits in args.bits:
        for method in filter(None, args.methods.split(",")):
            run("flexquant", method, bits)
        for peer in peers:
            run("peer", peer, bits)
    for spec in args.flexible:
        opts = parse_flexible(spec)
        run("flexquant", "flexible", round(opts["bpw"]), opts)
    print(write(args, header, rows))


def write(args, header: str, rows: list[dict]) -> str:
    md = f"{header}\n\n{table(rows)}\n"
    for suffix, text in ((".md", md), (".json", json.dumps({"header": header, "rows": rows}, indent=2))):
        path = Path(args.out, args.name + suffix)
        path.with_suffix(".tmp").write_text(text)
        path.with_suffix(".tmp").replace(path)
    return md


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_job":
        jp = argparse.ArgumentParser()
        for a in ("--model", "--method", "--calib", "--out"):
            jp.add_argument(a, required=True)
        jp.add_argument("--options", default="{}")
        jp.add_argument("--bits", type=int, required=True)
        jp.add_argument("--group-size", type=int, required=True)
        job(jp.parse_args(sys.argv[2:]))
    else:
        main()

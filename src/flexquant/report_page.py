"""`flexquant report DIR`: a page people read (Markdown + PNGs, or one self-contained HTML file) made from
a checkpoint's run report (report.json) and quant_config.json: the run's figures, plots of bits and error
per layer, the transform choices, and a per-layer table.

Checkpoints without a run report (imported GPTQ / compressed-tensors folders, older saves) get what their
stored tensors tell: bits and bpw per layer.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import tempfile
from pathlib import Path

from .errors import FlexQuantError
from .report import plot_flexible, plot_report

log = logging.getLogger(__name__)


def _load(path: Path) -> dict:
    """The run report of ``path``, or one reconstructed from the stored tensors' settings."""
    rep = path / "report.json"
    if rep.is_file():
        try:
            report = json.loads(rep.read_text())
        except (OSError, ValueError) as e:  # (invalid UTF-8 is a ValueError too)
            raise FlexQuantError(f"{rep} is unreadable ({e}); re-save the checkpoint or remove report.json") from e
        if not isinstance(report, dict):
            raise FlexQuantError(f"{rep} is not a run report (a JSON object); re-save the checkpoint or remove it")
        return report
    if (path / "quant_config.json").is_file():
        from .format.checkpoint import read_quant_config

        qc = read_quant_config(path)
        modules, method = qc["modules"], (qc.get("quant_config") or {}).get("method", "?")
        model, source = (qc.get("quant_config") or {}).get("model", path.name), "quant_config.json"
        summary = qc.get("summary") or {}
    else:
        from .interop import foreign_format, foreign_info

        if not foreign_format(path):
            raise FlexQuantError(f"{path} is not a flexquant checkpoint or a GPTQ / compressed-tensors folder")
        info = foreign_info(path)
        modules, method, model, source = info["modules"], info["format"] + " (imported)", path.name, info["format"]
        summary = {"bpw": info["bpw"], "quantized_weights": info["quantized_weights"]}
    layers = [{"name": n, "shape": [m["out_features"], m["in_features"]], "bits": m["bits"],
               "mean_bits": None, "bpw": m["bpw"], "rel_error": None, "seconds": None} for n, m in modules.items()]
    weights = sum(m["in_features"] * m["out_features"] for m in modules.values())
    if summary.get("bpw") is None and weights:
        summary["bpw"] = sum(lay["bpw"] * lay["shape"][0] * lay["shape"][1] for lay in layers) / weights
    return {"config": {"model": model, "method": method}, "summary": summary, "layers": layers, "blocks": [],
            "method": {}, "_source": source}


def transform_choices(report: dict) -> dict[str, str]:
    """Site -> chosen transform, from any method summary that records choices (adaptive transforms, rotations)."""
    out: dict[str, str] = {}

    def walk(obj, key=""):
        if isinstance(obj, dict):
            if any(w in key for w in ("transform", "choice", "selection")) and obj and \
                    all(isinstance(v, str) for v in obj.values()):
                out.update(obj)
                return
            for k, v in obj.items():
                walk(v, str(k).lower())

    walk(report.get("method") or {})
    flex = (report.get("method") or {}).get("flexible") or {}
    rot = flex.get("rotation") or {}
    if rot.get("residual"):
        out.setdefault("residual stream", f"randomized Hadamard n={rot['residual']['n']} (folded into weights)")
    for site in (rot.get("online") or {}).get("sites", []):
        out.setdefault(site, "online Hadamard on the input")
    return out


def plot_transforms(choices: dict[str, str], path: Path) -> Path | None:
    if not choices:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts: dict[str, int] = {}
    for v in choices.values():
        counts[v] = counts.get(v, 0) + 1
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.4 * len(counts)))
    ax.barh(list(counts), list(counts.values()), color="tab:purple")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("sites")
    ax.set_title("transform choices")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(v, digits=4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def figures(report: dict, path: Path) -> list[tuple[str, str]]:
    cfg, s = report.get("config") or {}, report.get("summary") or {}
    grid = cfg.get("grid") or {}
    rows = [("model", cfg.get("model")), ("method", cfg.get("method")),
            ("bits per weight (stored, metadata included)", _fmt(s.get("bpw"))),
            ("quantized weights", f"{s['quantized_weights']:,}" if s.get("quantized_weights") else None)]
    if grid:
        rows.append(("grid", f"{grid.get('bits')} bits, group {grid.get('group_size')}, "
                             f"{'symmetric' if grid.get('sym') else 'asymmetric'}, clip {grid.get('clip')}"))
    cal = report.get("calibration") or {}
    if cal:
        rows.append(("calibration", f"{cal.get('text')}: {cal.get('nsamples')} × {cal.get('seqlen')} tokens"
                     if cal.get("tokens") else "none (data-free method)"))
    if s.get("quant_seconds") is not None:
        rows.append(("quantization time", f"{s['quant_seconds']:.1f} s"))
    if s.get("peak_rss_mb") is not None:
        rows.append(("peak memory (RSS)", f"{s['peak_rss_mb']:.0f} MB"))
    if s.get("mean_rel_error") is not None:
        rows.append(("mean relative output error", _fmt(s["mean_rel_error"])))
    ev = report.get("eval") or {}
    for k in ("perplexity", "kl_divergence", "windows", "seqlen"):
        if ev.get(k) is not None:
            rows.append((f"eval {k.replace('_', ' ')}", _fmt(ev[k])))
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".json"))
    rows.append(("size on disk (tensors + JSON)", f"{size / 2**20:.1f} MiB"))
    for k in ("date", "flexquant_version"):
        if report.get(k):
            rows.append((k.replace("_", " "), report[k]))
    if report.get("machine"):
        rows.append(("machine", ", ".join(f"{k} {v}" for k, v in report["machine"].items())))
    return [(k, str(v)) for k, v in rows if v is not None]


def layer_rows(report: dict) -> list[list[str]]:
    rows = []
    for lay in report.get("layers", []):
        shape = "×".join(map(str, lay.get("shape") or [])) or "—"
        bits = lay.get("bits") or ([lay["mean_bits"]] if lay.get("mean_bits") is not None else None)
        rows.append([lay["name"], shape, ",".join(_fmt(b, 3) for b in bits) if bits else "—",
                     _fmt(lay.get("bpw")), _fmt(lay.get("rel_error")), _fmt(lay.get("seconds"), 3)])
    return rows


def write_report_page(path: str | Path, out: str | Path | None = None, html_page: bool = False) -> Path:
    """Write the report page for checkpoint ``path`` (Markdown + PNGs, or one HTML file); returns the file."""
    path = Path(path)
    if not path.is_dir():
        raise FlexQuantError(f"{path} is not a folder; pass a checkpoint folder")
    report = _load(path)
    out = Path(out) if out else path / ("report.html" if html_page else "report.md")
    if out.is_dir():
        raise FlexQuantError(f"--out {out} is a folder; pass a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.stem
    plots: list[tuple[str, Path]] = []
    try:
        p = plot_report(report, out.parent / f"{stem}_layers.png")
        if p:
            plots.append(("Bits and error per layer", p))
        p = plot_flexible(report, out.parent / f"{stem}_flexible.png")
        if p:
            plots.append(("FlexibleLLM: allocation, protection, noise, incoherence", p))
        choices = transform_choices(report)
        p = plot_transforms(choices, out.parent / f"{stem}_transforms.png")
        if p:
            plots.append(("Transform choices", p))
    except ImportError:
        log.warning("matplotlib is not installed; the report has no plots")
        choices = transform_choices(report)
    text = _render_html(report, path, plots, choices) if html_page else _render_md(report, path, plots, choices, out)
    if html_page:  # the images live inside the page
        for _, p in plots:
            p.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


HEADER = ["layer", "shape", "bits", "bpw", "rel. error", "seconds"]


def _title(report: dict) -> str:
    cfg, s = report.get("config") or {}, report.get("summary") or {}
    bpw = f" · {s['bpw']:.3f} bpw" if s.get("bpw") is not None else ""
    return f"flexquant report: {cfg.get('model')} · {cfg.get('method')}{bpw}"


def _render_md(report: dict, path: Path, plots, choices, out: Path) -> str:
    lines = [f"# {_title(report)}", "", f"Checkpoint: `{path}`", "", "## Figures", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in figures(report, path)]
    for title, p in plots:
        lines += ["", f"## {title}", "", f"![{title}]({os.path.relpath(p, out.parent)})"]
    if choices:
        lines += ["", "## Transforms", "", "| site | choice |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in choices.items()]
    blocks = [b for b in report.get("blocks", []) if len(b) > 1]
    if blocks:
        keys = sorted({k for b in blocks for k in b if k != "block"})
        lines += ["", "## Blocks", "", "| block | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += ["| " + " | ".join([str(b.get("block"))] + [_fmt(b.get(k)) for k in keys]) + " |" for b in blocks]
    lines += ["", "## Layers", "", "| " + " | ".join(HEADER) + " |", "|---" * len(HEADER) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in layer_rows(report)]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _render_html(report: dict, path: Path, plots, choices) -> str:
    parts = [f"<h1>{html.escape(_title(report))}</h1>", f"<p>Checkpoint: <code>{html.escape(str(path))}</code></p>",
             "<h2>Figures</h2>", _table(["", ""], [list(r) for r in figures(report, path)])]
    for title, p in plots:
        data = base64.b64encode(p.read_bytes()).decode()
        parts += [f"<h2>{html.escape(title)}</h2>",
                  f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">']
    if choices:
        parts += ["<h2>Transforms</h2>", _table(["site", "choice"], [[k, v] for k, v in choices.items()])]
    parts += ["<h2>Layers</h2>", _table(HEADER, layer_rows(report))]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left;font-size:13px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(_title(report))}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")

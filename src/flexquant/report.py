"""The run report: a JSON summary of what was stored and how much error it cost, plus a PNG plot."""

from __future__ import annotations

import datetime as _dt
import logging
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from ._version import __version__
from .actquant.runtime import stored_bits as actquant_bits
from .nn.quant_linear import QuantLinear

log = logging.getLogger(__name__)


def summarize_bits(layers: dict[str, tuple[int, int]], runtime: int = 0) -> dict:
    """The bit summary of packed linears given as {path: (stored bits, weights)}, plus ``runtime`` bits (the
    online transforms and clipping ratios of weight-activation methods)."""
    bits = sum(b for b, _ in layers.values()) + runtime
    weights = sum(w for _, w in layers.values())
    return {"stored_bits": bits, "quantized_weights": weights, "bpw": bits / weights if weights else None,
            "per_layer_bpw": {n: b / w for n, (b, w) in layers.items()}, "runtime_bits": runtime}


def bit_summary(model: torch.nn.Module) -> dict:
    """Stored bits and weights of the quantized linears, read from the packed tensors."""
    layers = {name: (m.stored_bits(), m.in_features * m.out_features)
              for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    return summarize_bits(layers, actquant_bits(model))


def build_report(config, bits: dict, records, block_notes, seconds: float, peak_rss_mb: float,
                 calib_tokens: int | None) -> dict:
    """The run report; ``bits`` is `bit_summary` of the packed model (or `summarize_bits` of its layers)."""
    layers = []
    for r in records:
        d = asdict(r)
        d["bpw"] = bits["per_layer_bpw"].get(r.name)
        layers.append(d)
    errs = [r.rel_error for r in records if r.rel_error is not None]
    return {
        "flexquant_version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    # the ATen kernels' vector width: GPTQ amplifies its last-bit differences into other codes
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "config": config.to_dict(),
        "calibration": {"text": config.calib, "nsamples": config.nsamples, "seqlen": config.seqlen,
                        "tokens": calib_tokens},
        "summary": {
            "bpw": bits["bpw"],
            "stored_bits": bits["stored_bits"],
            "quantized_weights": bits["quantized_weights"],
            "quant_seconds": seconds,  # calibration + quantization + packing; model loading excluded
            "peak_rss_mb": peak_rss_mb,
            "mean_rel_error": sum(errs) / len(errs) if errs else None,
        },
        "layers": layers,
        "blocks": block_notes,
    }


def plot_report(report: dict, path: str | Path) -> Path | None:
    """Per-layer bpw and relative output error, one point per linear, in model order."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; skipping the report plot")
        return None
    layers = report["layers"]
    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    x = range(len(layers))
    axes[0].bar(x, [lay["bpw"] or 0 for lay in layers], color="tab:blue")
    axes[0].set_ylabel("stored bits / weight")
    axes[0].set_title(f"{report['config']['model']} · {report['config']['method']} · "
                      f"{report['summary']['bpw']:.3f} bpw overall")
    errs = [lay["rel_error"] for lay in layers]
    if any(e is not None for e in errs):
        axes[1].semilogy(x, [e or float("nan") for e in errs], ".", color="tab:red")
    axes[1].set_ylabel("rel. output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)")
    axes[1].set_xlabel("linear layer (model order)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_flexible(report: dict, path: str | Path) -> Path | None:
    """FlexibleLLM facts: bits per matrix, bit histogram, protected columns, block noise, incoherence."""
    facts = (report.get("method") or {}).get("flexible")
    if not facts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 8))
    per = facts["allocation"]["per_matrix_bits"]
    names = list(per)
    ax[0, 0].bar(range(len(names)), list(per.values()), color="tab:blue")
    ax[0, 0].set_title(f"code bits per matrix (target {facts['allocation']['target_bpw']} bpw, "
                       f"planned {facts['allocation']['planned_bpw']:.3f})")
    ax[0, 0].set_xlabel("linear (model order)")
    hist = facts["allocation"]["histogram"]
    ax[0, 1].bar(range(len(hist)), list(hist.values()), color="tab:green", tick_label=[str(k) for k in hist])
    ax[0, 1].set_title("groups per bit-width")
    prot = facts.get("protected") or {}
    if prot:
        ax[0, 1].text(0.02, 0.95, f"protected columns: {sum(v['columns'] for v in prot.values())} "
                      f"({sum(v['attribute_outliers'] for v in prot.values())} attribute outliers)",
                      transform=ax[0, 1].transAxes, va="top")
    blocks = [b for b in report.get("blocks", []) if "noise_before" in b]
    if blocks:
        ax[1, 0].plot([b["block"] for b in blocks], [b["noise_before"] for b in blocks], "o-", label="before")
        ax[1, 0].plot([b["block"] for b in blocks], [b["noise_after"] for b in blocks], "s--", label="after LFD")
        ax[1, 0].legend()
    ax[1, 0].set_title("relative block-output noise ‖h_q − h_fp‖/‖h_fp‖")
    inc = facts.get("incoherence") or {}
    if inc:
        ax[1, 1].semilogy([v["before"] for v in inc.values()], ".", label="before rotation")
        ax[1, 1].semilogy([v["after"] for v in inc.values()], ".", label="after rotation")
        ax[1, 1].legend()
    ax[1, 1].set_title("incoherence μ(W) per linear" + ("" if inc else " (no rotation)"))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_hiratio(report: dict, path: str | Path) -> Path | None:
    """High-impact ratio facts: ratio per layer (QP answer, rounded, equal), the fitted a and Q, and the
    predicted vs measured loss of the chosen allocation."""
    facts = (report.get("method") or {}).get("hiratio")
    if not facts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alloc, qp, budget = facts["allocation"], facts.get("qp") or {}, facts["budget"]
    fig, ax = plt.subplots(1, 3 if qp else 1, figsize=(16 if qp else 8, 4.5), squeeze=False)
    ax = ax[0]
    x = range(len(alloc["ratios"]))
    ax[0].bar(x, alloc["ratios"], color="tab:blue", label=f"stored ({alloc['mode']})")
    if qp:
        ax[0].plot(x, qp["solution"], "k.", label="QP answer (continuous)")
    ax[0].axhline(budget["equal_ratio"], color="tab:red", ls="--", label="equal ratio")
    ax[0].set_xlabel("decoder layer")
    ax[0].set_ylabel("high-impact ratio r_l")
    ax[0].set_title(f"ratio per layer · {alloc['planned_bpw']:.3f} bpw (target {budget['target_bpw']})")
    ax[0].legend()
    if qp and qp.get("curves"):  # curve loss model: each layer's fitted convex curve, relative to the centre
        c = facts["probe"]["center_ratios"]
        for i, (xs, g) in enumerate(qp["curves"]):
            at_c = next((v for xv, v in zip(xs, g) if xv >= c[i]), g[-1])  # the centre is one of the knots
            ax[1].plot(xs, [v - at_c for v in g], "-", lw=1,
                       color=plt.cm.viridis(i / max(1, len(qp["curves"]) - 1)))
        ax[1].set_title("per-layer loss curves ΔL_l(r) (dark: first layer)")
        ax[1].set_xlabel("ratio r_l")
    elif qp:
        ax[1].plot(x, qp["a"], "o-", label="a_l")
        ax[1].plot(x, [row[i] for i, row in enumerate(qp["Q_psd"])], "s--", label="Q_ll (PSD)")
        ax[1].axhline(0, color="grey", lw=0.5)
        ax[1].set_title("loss model ΔL = aᵀr + ½rᵀQr")
        ax[1].set_xlabel("decoder layer")
        ax[1].legend()
    if qp:
        im = ax[2].imshow(qp["Q_psd"], cmap="coolwarm")
        fig.colorbar(im, ax=ax[2])
        ax[2].set_title(f"Q · predicted KL {qp['predicted_kl']:.4f}, measured {qp['measured_probe_kl']:.4f}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""`flexquant info`: bits per weight, file size and per-layer settings of a checkpoint (also foreign ones)."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("info", help="bpw, file size and per-layer settings of a checkpoint")
    p.add_argument("path", help="a flexquant checkpoint folder, or a GPTQ / compressed-tensors folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_info)


def run_info(a) -> int:
    from ..api import recovered
    from ..format.checkpoint import QUANT_CONFIG, read_verified, tensor_files
    from ..interop import foreign_format

    path = Path(a.path)
    recovered(path)
    if not (path / QUANT_CONFIG).is_file() and foreign_format(path):
        return print_foreign_info(path, a.json)
    qc = read_verified(path)[0]  # only verified values are reported
    mods = qc["modules"]
    weights = {n: m["in_features"] * m["out_features"] for n, m in mods.items()}
    total_w = sum(weights.values())
    info = {
        "path": str(path),
        "format_version": qc["format_version"],
        "library_version": qc.get("library_version"),
        "method": (qc.get("quant_config") or {}).get("method"),
        "bpw": sum(m["bpw"] * weights[n] for n, m in mods.items()) / total_w if total_w else None,
        "quantized_weights": total_w,
        "file_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "tensor_file_bytes": sum(f.stat().st_size for f in tensor_files(path, qc)),
        "modules": mods,
    }
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{path}: {info['method']} · {info['bpw']:.4f} bpw over {total_w:,} weights · "
          f"{info['file_bytes'] / 2**20:.1f} MiB on disk (format v{info['format_version']})")
    print(f"{'module':<40} {'shape':>12} {'group':>6} {'bits':>10} {'bpw':>7}")
    for n, m in mods.items():
        print(f"{n:<40} {m['out_features']:>5}x{m['in_features']:<6} {m['group_size']:>6} "
              f"{','.join(map(str, m['bits'])):>10} {m['bpw']:>7.3f}")
    return 0


def print_foreign_info(path: Path, as_json: bool) -> int:
    from ..interop import foreign_info

    info = foreign_info(path)
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{path}: {info['format']} (foreign) · {info['bpw']:.4f} bpw over {info['quantized_weights']:,} weights · "
          f"{info['file_bytes'] / 2**20:.1f} MiB on disk")
    print(f"{'module':<40} {'shape':>12} {'group':>6} {'bits':>5} {'sym':>4} {'act':>4} {'bpw':>7}")
    for n, m in info["modules"].items():
        print(f"{n:<40} {m['out_features']:>5}x{m['in_features']:<6} {m['group_size']:>6} {m['bits'][0]:>5} "
              f"{'y' if m['sym'] else 'n':>4} {'y' if m['act_order'] else 'n':>4} {m['bpw']:>7.3f}")
    return 0

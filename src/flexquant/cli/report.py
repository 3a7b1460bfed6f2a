"""`flexquant report`: a readable page (Markdown or HTML) with a checkpoint's plots and figures."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("report", help="write a readable page (Markdown or HTML) with the run's plots and figures",
                       description="Write DIR/report.md (or --html: report.html with the plots embedded) from "
                                   "a checkpoint's report.json and quant_config.json, with plots of bits and "
                                   "error per layer and the transform choices.")
    p.add_argument("path", help="flexquant checkpoint folder (or a GPTQ / compressed-tensors folder)")
    p.add_argument("--out", default=None, help="output file (default: DIR/report.md or DIR/report.html)")
    p.add_argument("--html", action="store_true", help="one self-contained HTML file instead of Markdown + PNGs")
    p.set_defaults(func=run_report)


def run_report(a) -> int:
    from ..report_page import write_report_page

    out = write_report_page(a.path, a.out, html_page=a.html)
    print(json.dumps({"report": str(out)}))
    return 0

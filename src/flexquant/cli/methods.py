"""`flexquant methods`: every registered method with its options, defaults and help."""

from __future__ import annotations

import dataclasses
import json

from .flags import default_of, flag, show


def register(sub) -> None:
    p = sub.add_parser("methods", help="list the quantization methods and their options with defaults",
                       description="List every method `flexquant quantize --method NAME` accepts, with its "
                                   "option flags, their defaults and what they do.")
    p.add_argument("name", nargs="?", help="show one method only")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_methods)


def describe() -> dict:
    """{method: {"about": first docstring line, "options": {name: {"default", "help", "choices"}}}}."""
    from ..methods import METHODS

    out = {}
    for name, cls in sorted(METHODS.items()):
        options = {}
        for f in dataclasses.fields(cls.Config):
            d = default_of(f)
            options[f.name] = {"default": list(d) if isinstance(d, tuple) else d, "help": f.metadata.get("help", "")}
            if "choices" in f.metadata:
                options[f.name]["choices"] = list(f.metadata["choices"])
        out[name] = {"about": (cls.__doc__ or "").strip().splitlines()[0], "options": options}
    return out


def run_methods(a) -> int:
    from ..errors import FlexQuantError

    info = describe()
    if a.name:
        if a.name not in info:
            raise FlexQuantError(f"unknown method {a.name!r}; available: {', '.join(info)}")
        info = {a.name: info[a.name]}
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    for name, m in info.items():
        print(f"{name}: {m['about']}")
        if not m["options"]:
            print("    (the grid and GPTQ flags only: --bits, --group-size, --sym, --damp, --act-order, ...)")
        for opt, o in m["options"].items():
            choices = f" {{{'|'.join(map(str, o['choices']))}}}" if "choices" in o else ""
            default = show(tuple(o["default"]) if isinstance(o["default"], list) else o["default"])
            print(f"    {flag(opt)}{choices}  [default: {default}]\n        {o['help']}")
        print()
    return 0

"""The layer order of docs/architecture.md holds for every import in src/ (module level and inside functions),
no file in src/ is over 500 lines and no function over 80."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "flexquant"


def layers() -> dict[str, int]:
    """{unit: layer number} from the numbered list under "## Layers"."""
    text = (ROOT / "docs" / "architecture.md").read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in text.splitlines():
        m = re.match(r"(\d+)\. (.*?) —", line)
        if m:
            for unit in re.findall(r"`([\w.]+)`", m.group(2)):
                out[unit] = int(m.group(1))
    return out


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "flexquant"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported flexquant module) of every import in ``path``, nested ones included."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = ".".join(rel.parts[:-1]) if path.name != "__init__.py" else ".".join(rel.parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            found += [(node.lineno, n) for n in names if n.startswith("flexquant")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("flexquant")]
    return found


def test_the_layer_list_names_every_unit():
    units = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert units | {"flexquant"} == set(layers())


def test_no_import_from_a_lower_layer_to_a_higher_one():
    order, bad = layers(), []
    for path in SRC.rglob("*.py"):
        here = unit_of(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
        if path == SRC / "__init__.py":
            here = "flexquant"
        for line, target in imports(path):
            there = unit_of(target)
            if there != here and order[there] >= order[here]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({here}, layer {order[here]}) imports {target} "
                           f"(layer {order[there]})")
    assert not bad, "\n".join(bad)


def test_files_and_functions_stay_small():
    too_long = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 500:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "\n".join(too_long)

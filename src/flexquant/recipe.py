"""Recipe files: a `QuantConfig` serialised as YAML (or JSON). Every checkpoint holds the recipe it was made
with (``recipe.yaml``); ``flexquant quantize --recipe FILE`` runs it again and gives the same tensors."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ._version import __version__
from .config import QuantConfig
from .errors import FlexQuantError

RECIPE = "recipe.yaml"


def write_recipe(config: QuantConfig, path: str | Path, note: str | None = None) -> Path:
    """Write ``config`` (resolved: every default spelled out) to ``path`` as YAML, with a comment header."""
    path = Path(path)
    head = [f"# flexquant {__version__} recipe: `flexquant quantize --recipe {path.name} --out DIR` runs it again"]
    if note:
        head.append(f"# note: {note}")
    path.write_text("\n".join(head) + "\n" + yaml.safe_dump(config.to_plain(), sort_keys=False))
    return path


def read_recipe(path: str | Path) -> QuantConfig:
    """The `QuantConfig` of a recipe file (YAML, or JSON by its suffix); clear errors for anything else."""
    path = Path(path)
    if path.is_dir() and (path / RECIPE).is_file():
        path = path / RECIPE  # a checkpoint folder: its own recipe
    if not path.is_file():
        raise FlexQuantError(f"recipe file {path} does not exist; pass a recipe.yaml (every checkpoint folder "
                             "has one) or a JSON file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise FlexQuantError(f"recipe {path} is not valid {kind}: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise FlexQuantError(f"recipe {path} must hold a mapping of config fields (model, method, grid, ...)")
    try:
        return QuantConfig.from_dict(data)
    except FlexQuantError as e:
        raise FlexQuantError(f"recipe {path}: {e}") from e

"""Architecture knowledge as data (`ModelSpec`), the family registry and model loading."""

from .loader import load_model, load_tokenizer, resolve_model_path
from .spec import SPECS, ModelSpec, get_spec

__all__ = ["SPECS", "ModelSpec", "get_spec", "load_model", "load_tokenizer", "resolve_model_path"]

"""Loading a model and tokenizer from a built-in name, a local folder or a hub id."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import FlexQuantError
from .builtin import BUILTIN_MODELS, smollm2_path, tiny_llama

log = logging.getLogger(__name__)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so offline machines fail at once instead of retrying."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return True  # offline mode: transformers reads the local cache only, without network retries
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model_path(name: str) -> str:
    """A local folder or hub id for ``name`` (built-in names are fetched/cached as needed)."""
    if name == "smollm2-135m":
        return str(smollm2_path())
    if not Path(name).exists() and not _hub_reachable():
        raise _hub_error(name, OSError("the model hub cannot be reached from this machine"))
    return name


def _hub_error(name: str, exc: Exception) -> FlexQuantError:
    return FlexQuantError(
        f"could not load model {name!r}: it is not a built-in name ({', '.join(BUILTIN_MODELS)}), "
        f"not a local folder, and not a reachable hub id ({type(exc).__name__}: "
        f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no detail'}). "
        "Offline, pass a local folder with config.json and safetensors weights"
    )


def load_tokenizer(name: str, trust_remote_code: bool = False):
    if name == "tiny-llama":
        return tiny_llama()[1]
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from e


def load_model(name: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) on CPU in the stored dtype (or ``dtype``), eval mode, KV cache off."""
    if name == "tiny-llama":
        model, tok = tiny_llama()
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        path = resolve_model_path(name)
        if Path(path).exists() and not (Path(path) / "config.json").is_file():
            raise FlexQuantError(f"{path} is a folder without config.json; it is not a Hugging Face model")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise _hub_error(name, e) from e
        from .spec import get_spec

        get_spec(config.model_type)  # unsupported families fail before the weights are read
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype or "auto", trust_remote_code=trust_remote_code,
                attn_implementation="sdpa",
            )
        except (OSError, ValueError) as e:
            raise _hub_error(name, e) from e
        tok = load_tokenizer(name, trust_remote_code)
    if dtype is not None:
        model = model.to(dtype)
    model.config.use_cache = False
    check_finite(model)
    return model.eval(), tok


def check_finite(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise FlexQuantError(
                f"parameter {name} contains NaN or inf values; the checkpoint is corrupted or was "
                "saved in a dtype that overflowed; re-export it in float32/bfloat16"
            )

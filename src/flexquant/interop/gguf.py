"""GGUF files for llama.cpp (and ollama, LM Studio): the container written by the ``gguf`` package, the tensor
encodings flexquant's own.

A quantized linear is written in the GGML block type whose grid is exactly its flexquant grid, so llama.cpp
computes with the very weights flexquant quantized (``--target gguf`` makes every method quantize into these):

  Q4_0  blocks of 32 weights: float16 d, 16 bytes of 4-bit codes (byte j: code j low nibble, code j+16 high);
        w = d·(q − 8)        — flexquant's symmetric 4-bit grid (zero 8), float16 scale, group 32
  Q5_0  float16 d, uint32 of the codes' fifth bits (bit j of code j), 16 bytes of low nibbles as Q4_0;
        w = d·(q − 16)       — the symmetric 5-bit grid (zero 16)
  Q8_0  float16 d, 32 signed bytes; w = d·q with q = code − 128 — the symmetric 8-bit grid (zero 128)
  Q3_K, Q6_K  256-weight super-blocks of 16-weight groups whose scales are integer multiples of one float16
        step (`interop.gguf_kquants`) — the 3- and 6-bit symmetric grids, group 16, with ``GridConfig.superblock``

GGML's blocks run along a row (a linear's input dimension), as flexquant's groups do. Everything else is refused
with the fix: asymmetric grids (Q4_1's float minimum is not flexquant's integer zero point), other group sizes or
widths, act-order permutations (GGUF has no per-column group index), online rotations. The token embedding and the
output head follow llama.cpp's convention for small models: Q8_0 (round-to-nearest, as llama-quantize does;
``embedding`` q5_0 / q4_0 rounds them coarser, leaving more of a file size to the linears; f16 / f32 keeps them in
float); norms in float32; linears left in float (an online rotation folded
in) in float16, or float32 with ``dtype`` float32. A plain transformers folder (no quant_config.json) is written
all in float (``float_source``): the F32/F16 file llama.cpp's own quantizer starts from.

llama.cpp's ``llama`` architecture applies rotary embeddings to adjacent pairs where transformers rotates the two
halves of a head, so q_proj and k_proj rows are reordered per head (exact: a row permutation moves whole
rows of codes and scales).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import FlexQuantError
from . import gguf_kquants as kquants
from .common import GridLayer, Source, check_architecture, read_json

log = logging.getLogger(__name__)
FORMAT = "gguf"
GROUP = 32
BLOCK_TYPES = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}  # width -> GGML type of the symmetric grid with fp16 scales


@dataclass(frozen=True)
class Architecture:
    """How one transformers family is written for llama.cpp (data; `hyperparameters` reads the config)."""

    gguf: str  # GGUF architecture name (gguf.MODEL_ARCH member, lower case)
    rope_pairs: bool  # llama.cpp rotates adjacent pairs: q_proj / k_proj rows reordered per head (`rope_pairs`)
    norm_shift: float = 0.0  # added to every *norm.weight: Gemma's RMSNorm scales by (1 + w), llama.cpp's by w


LLAMA = Architecture("llama", rope_pairs=True)
ARCHITECTURES = {"llama": LLAMA, "mistral": LLAMA,  # transformers model_type -> how it is written
                 "gemma3_text": Architecture("gemma3", rope_pairs=False, norm_shift=1.0)}
FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q5_0": "MOSTLY_Q5_0", "Q8_0": "MOSTLY_Q8_0", "Q3_K": "MOSTLY_Q3_K_S",
              "Q6_K": "MOSTLY_Q6_K"}
EMBEDDINGS = ("q8_0", "q5_0", "q4_0", "f16", "f32")  # the token embedding and output head
GGUF_MAGIC = b"GGUF"
ROPE_ROWS = ("q_proj", "k_proj")


def float_source(path: str | Path) -> Source:
    """A transformers folder of float weights (no quant_config.json) read for a float GGUF file."""
    from ..tensorio import TensorFiles

    path = Path(path)
    config = read_json(path, "config.json")
    files = TensorFiles(path)
    return Source(path, {}, config, rest={k: files.get(k) for k in files.names()})


def block_bytes(layer: GridLayer) -> tuple[np.ndarray, str]:
    """(uint8 [m, n/32 · block size], GGML type name) of a linear on a Q4_0 / Q5_0 / Q8_0 grid (or a Q3_K /
    Q6_K one: `interop.gguf_kquants`)."""
    if why := _refusal(layer):
        raise FlexQuantError(why)
    if layer.group_size == kquants.GROUP:
        return kquants.block_bytes(layer.codes, layer.scales, layer.bits)
    kind = BLOCK_TYPES[layer.bits]
    m, n = layer.shape
    codes = layer.codes.to(torch.int32).view(m, n // GROUP, GROUP).numpy()
    d = layer.scales.to(torch.float16).numpy().view(np.uint8).reshape(m, n // GROUP, 2)
    if kind == "Q8_0":
        parts = [d, (codes - 128).astype(np.int8).view(np.uint8)]
    else:
        low = codes & 0xF
        qs = (low[..., :16] | (low[..., 16:] << 4)).astype(np.uint8)
        parts = [d, qs]
        if kind == "Q5_0":
            high = ((codes >> 4) & 1).astype(np.uint32) << np.arange(GROUP, dtype=np.uint32)
            qh = np.bitwise_or.reduce(high, axis=-1).astype("<u4").view(np.uint8).reshape(m, n // GROUP, 4)
            parts = [d, qh, qs]
    return np.concatenate(parts, axis=-1).reshape(m, -1), kind


def _refusal(layer: GridLayer) -> str | None:
    """Why ``layer`` is no GGML block type exactly, with the fix; None when it is one."""
    why = []
    kquant = layer.group_size == kquants.GROUP
    if kquant and layer.sym and not kquants.representable(layer.bits, layer.group_size, layer.shape[1],
                                                          layer.scales):
        why.append(f"{layer.bits}-bit groups of 16 that are no K-quant block (Q3_K / Q6_K need 3 or 6 bits, rows "
                   "of a multiple of 256 and scales that are multiples of one float16 step per 256 columns)")
    if not kquant and layer.bits not in BLOCK_TYPES:
        why.append(f"{layer.bits}-bit weights (GGUF's exact block types hold 4, 5 or 8)")
    if not layer.sym:
        why.append("an asymmetric grid (integer zero points)")
    if not kquant and layer.group_size != GROUP:
        why.append(f"groups of {layer.group_size} (GGML blocks hold {GROUP}, K-quants 16)")
    if layer.g_idx is not None:
        why.append("an act-order permutation (GGUF has no per-column group index)")
    if not why:
        return None
    return (f"{layer.name} cannot be written exactly as a GGML block type: {', '.join(why)}; requantize with "
            "--target gguf (symmetric 4/5/8-bit grids, group 32, float16 scales, no act-order permutation)")


def rope_pairs(rows: int, heads: int) -> torch.Tensor:
    """Row order that turns transformers' half-split rotary layout into llama.cpp's adjacent pairs: new row
    h·d + 2i + j of a head of d rows is old row h·d + j·d/2 + i."""
    d = rows // heads
    h = torch.arange(heads).view(-1, 1, 1) * d
    i = torch.arange(d // 2).view(1, -1, 1)
    j = torch.arange(2).view(1, 1, -1) * (d // 2)
    return (h + i + j).reshape(-1)


def _reorder(layer: GridLayer, order: torch.Tensor) -> GridLayer:
    return GridLayer(layer.name, layer.bits, layer.group_size, layer.sym, layer.codes[order], layer.scales[order],
                     layer.zeros[order], layer.g_idx, None if layer.bias is None else layer.bias[order])


def hyperparameters(config: dict) -> dict:
    """The GGUF hyperparameters of a transformers config (llama, mistral, gemma3_text), or a clear refusal."""
    mt = config.get("model_type")
    if mt not in ARCHITECTURES:
        raise FlexQuantError(f"GGUF export supports the model types {', '.join(ARCHITECTURES)} so far; this "
                             f"checkpoint is {mt!r}: export it to compressed-tensors or GPTQ instead")
    arch = ARCHITECTURES[mt]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    local = {}
    if arch.gguf == "gemma3":  # per layer type; llama.cpp's gemma3 has every 6th layer global, the rest sliding
        local, rope = rope.get("sliding_attention") or {}, rope.get("full_attention") or rope
        types = config.get("layer_types") or []
        pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(types))]
        if types != pattern:
            raise FlexQuantError("this Gemma 3 model's layer types are not llama.cpp's pattern (every 6th layer "
                                 "global); export it to compressed-tensors instead")
        scale = config["hidden_size"] // heads if config["num_hidden_layers"] == 62 else head_dim
        if config.get("query_pre_attn_scalar", scale) != scale:  # llama.cpp derives it from the model's size
            raise FlexQuantError(f"query_pre_attn_scalar {config['query_pre_attn_scalar']} is not the {scale} "
                                 "llama.cpp assumes for this Gemma 3 size; export to compressed-tensors instead")
        for what in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(what):
                raise FlexQuantError(f"{what} is not written to GGUF yet; export to compressed-tensors instead")
    for r in (rope, local):
        if r.get("rope_type", r.get("type", "default")) not in ("default", None):
            raise FlexQuantError(f"rotary scaling {r.get('rope_type') or r.get('type')!r} is not written to GGUF "
                                 "yet; export to compressed-tensors or GPTQ instead")
    hp = {"arch": arch, "context_length": config.get("max_position_embeddings", 2048),
          "embedding_length": config["hidden_size"], "block_count": config["num_hidden_layers"],
          "feed_forward_length": config["intermediate_size"], "head_count": heads,
          "head_count_kv": config.get("num_key_value_heads") or heads,
          "rope_freq_base": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
          "layer_norm_rms_eps": float(config.get("rms_norm_eps", 1e-6)), "rope_dimension_count": head_dim,
          "head_dim": head_dim, "vocab_size": config["vocab_size"],
          "tied": bool(config.get("tie_word_embeddings", False))}
    if arch.gguf == "gemma3":
        hp |= {"sliding_window": int(config["sliding_window"]),
               "rope_freq_base_swa": float(local.get("rope_theta", 10000.0))}
    return hp


def tokenizer_pre(folder: Path, tj: dict, given: str | None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (its splitting regex): ``given``, or recognised
    from the folder's tokenizer.json (parsed: ``tj``). An unrecognised one is refused rather than guessed (a
    wrong split tokenizes differently: a silent wrong answer)."""
    if given:
        return given
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex")) for s in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"  # GPT-2's regex, no digit split
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"  # single digits, then GPT-2's regex
    raise FlexQuantError(f"{folder}/tokenizer.json: its pre-tokenizer ({json.dumps(pre)[:120]}...) is not one "
                         "flexquant recognises; pass --gguf-pre with llama.cpp's name for it (e.g. llama-bpe, "
                         "qwen2, gpt-2; see llama.cpp's convert_hf_to_gguf.py)")


def _add_tokenizer(w, folder: Path, vocab_size: int, pre: str | None) -> None:
    import gguf

    if not (folder / "tokenizer.json").is_file():
        raise FlexQuantError(f"{folder} has no tokenizer.json; a GGUF file carries its tokenizer: copy the model's "
                             "tokenizer files into the checkpoint folder")
    tj = read_json(folder, "tokenizer.json")
    if _sentencepiece_style(tj):
        return _add_sentencepiece(w, folder, tj, vocab_size)
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError) as e:
        raise FlexQuantError(f"{folder}: only byte-level BPE tokenizers (GPT-2 style) and SentencePiece-style BPE "
                             f"ones are written to GGUF so far ({' '.join(str(e).split())})") from e
    tokens, types = [], []
    for text, _, kind in vocab.all_tokens():
        tokens.append(text.encode("utf-8") if isinstance(text, str) else text)
        types.append(kind)
    for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer (padded vocabularies)
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer_pre(folder, tj, pre))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if not special.merges:  # llama.cpp refuses a BPE vocabulary without merges, and GGUF has no empty arrays
        raise FlexQuantError(f"{folder}/tokenizer.json is a BPE tokenizer without merges, which llama.cpp cannot "
                             "load; give the checkpoint the model's real tokenizer files")
    special.add_to_gguf(w, quiet=True)


def _sentencepiece_style(tj: dict) -> bool:
    """A BPE tokenizer converted from SentencePiece (Gemma, Llama 2): byte fallback, spaces written as ▁."""
    model = tj.get("model") or {}
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback"))
            and "\u2581" in json.dumps(tj.get("normalizer") or tj.get("pre_tokenizer") or {}, ensure_ascii=False))


def _add_sentencepiece(w, folder: Path, tj: dict, vocab_size: int) -> None:
    """llama.cpp's SentencePiece vocabulary ("llama"): pieces, scores and types. SentencePiece merges the adjacent
    pair whose piece scores highest; a converted tokenizer.json keeps the merges in that order, so a piece's score
    is minus the rank of the merge that makes it (single characters, bytes and special tokens: 0)."""
    import gguf

    vocab = tj["model"]["vocab"]
    text = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in tj.get("added_tokens") or []}
    rank = {}
    for r, m in enumerate(tj["model"].get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    unk = tj["model"].get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        t = added[i]["content"] if i in added else text.get(i)
        if t is None:  # embedding rows past the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1e9)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(t.encode("utf-8"))
        scores.append(-float(rank[t]) if t in rank and i not in added else 0.0)
        types.append(gguf.TokenType.BYTE if len(t) == 6 and t.startswith("<0x") and t.endswith(">") else
                     gguf.TokenType.UNKNOWN if t == unk else
                     gguf.TokenType.CONTROL if i in added and added[i].get("special") else
                     gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix('"Prepend"' in json.dumps(tj.get("normalizer") or {}))  # Llama 2 prepends ▁, Gemma not
    gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _tensor_name(names, hf_name: str) -> str:
    gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise FlexQuantError(f"tensor {hf_name} has no GGUF name in its architecture; the checkpoint does not "
                             "match its config.json")
    return gname


def _plain(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


def _rope_order(name: str, rows: int, hp: dict) -> torch.Tensor | None:
    """The row order of a q_proj / k_proj weight in llama.cpp's rotary layout (None for other tensors)."""
    stem = name.removesuffix(".weight").rsplit(".", 1)[-1]
    if stem not in ROPE_ROWS or not hp["arch"].rope_pairs:
        return None
    return rope_pairs(rows, hp["head_count"] if stem == "q_proj" else hp["head_count_kv"])


def _add_plain(w, gname: str, t: torch.Tensor, kind: str) -> None:
    """Write a float tensor as ``kind`` (q8_0, f16, f32; 1-D tensors always float32)."""
    import gguf

    if kind in ("q8_0", "q5_0", "q4_0") and t.dim() == 2 and t.shape[1] % GROUP == 0:
        qtype = gguf.GGMLQuantizationType[kind.upper()]  # round-to-nearest with GGML's own rule
        w.add_tensor(gname, gguf.quants.quantize(_plain(t, torch.float32), qtype), raw_dtype=qtype)
    else:
        w.add_tensor(gname, _plain(t, torch.float32 if kind == "f32" or t.dim() == 1 else torch.float16))


def write(src: Source, out: Path, dtype: str | None, pre: str | None, embedding: str) -> dict:
    """Write ``src`` as a GGUF file at ``out`` (caller handles atomicity); returns the summary."""
    import gguf

    hp = hyperparameters(src.config)
    arch = hp["arch"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf.upper()], hp["block_count"])
    dense_kind = "f32" if dtype == "float32" else "f16"
    w = gguf.GGUFWriter(out, arch.gguf)
    w.add_name(Path(src.path).name)
    w.add_context_length(hp["context_length"])
    w.add_embedding_length(hp["embedding_length"])
    w.add_block_count(hp["block_count"])
    w.add_feed_forward_length(hp["feed_forward_length"])
    w.add_head_count(hp["head_count"])
    w.add_head_count_kv(hp["head_count_kv"])
    w.add_rope_freq_base(hp["rope_freq_base"])
    w.add_layer_norm_rms_eps(hp["layer_norm_rms_eps"])
    w.add_rope_dimension_count(hp["rope_dimension_count"])
    if hp["head_dim"] != hp["embedding_length"] // hp["head_count"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if "sliding_window" in hp:
        w.add_sliding_window(hp["sliding_window"])
        w.add_rope_freq_base_swa(hp["rope_freq_base_swa"])
    w.add_vocab_size(hp["vocab_size"])
    _add_tokenizer(w, Path(src.path), hp["vocab_size"], pre)

    kinds: dict[str, int] = {}
    stored = weights = 0
    for name, layer in sorted(src.grids.items()):
        order = _rope_order(name, layer.shape[0], hp)
        data, kind = block_bytes(layer if order is None else _reorder(layer, order))
        w.add_tensor(_tensor_name(names, name + ".weight"), data, raw_dtype=gguf.GGMLQuantizationType[kind])
        kinds[kind] = kinds.get(kind, 0) + 1
        stored += data.nbytes * 8
        weights += layer.shape[0] * layer.shape[1]
    plain = {n + ".weight": layer.weight for n, layer in src.dense.items()} | src.rest
    for key, t in sorted(plain.items()):
        if hp["tied"] and key == "lm_head.weight" and torch.equal(t, plain.get("model.embed_tokens.weight", t)):
            continue  # llama.cpp reads the embedding when the output head is absent (a rotated head is written)
        order = _rope_order(key, t.shape[0], hp) if t.dim() == 2 else None
        gname = _tensor_name(names, key)
        if arch.norm_shift and key.endswith("norm.weight"):
            t = t.float() + arch.norm_shift
        _add_plain(w, gname, t if order is None else t[order],
                   embedding if gname in ("token_embd.weight", "output.weight") else dense_kind)
    main = max(kinds, key=kinds.get) if kinds else None
    w.add_file_type(gguf.LlamaFileType[FILE_TYPES[main]] if main else
                    gguf.LlamaFileType.ALL_F32 if dense_kind == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"block_types": kinds, "bpw": round(stored / weights, 6) if weights else 0.0,
            "quantized_weights": weights, "embedding": embedding}


def export(src: Source, out: str | Path, dtype: str | None = None, overwrite: bool = False,
           tokenizer_pre: str | None = None, embedding: str = "q8_0") -> dict:
    """Write the checkpoint read into ``src`` as one GGUF file ``out``, atomically (a temporary sibling file
    renamed into place; an existing file is replaced only with ``overwrite`` and only when it is a GGUF file)."""
    out = Path(out)
    if embedding not in EMBEDDINGS:
        raise FlexQuantError(f"embedding {embedding!r} must be one of {', '.join(EMBEDDINGS)}")
    if out.suffix != ".gguf":
        raise FlexQuantError(f"--out {out} must name a .gguf file")
    if out.is_dir():
        raise FlexQuantError(f"--out {out} is a folder; name a .gguf file")
    if out.exists():
        if not overwrite:
            raise FlexQuantError(f"{out} already exists; remove it or pass --overwrite")
        with open(out, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise FlexQuantError(f"refusing to overwrite {out}: it is not a GGUF file")
    check_architecture(src)
    for layer in src.grids.values():  # every refusal before a byte is written
        if why := _refusal(layer):
            raise FlexQuantError(why)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        summary = write(src, tmp, dtype, tokenizer_pre, embedding)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    summary.update({"format": FORMAT, "out": str(out), "file_bytes": out.stat().st_size,
                    "quantized_layers": len(src.grids)})
    types = ", ".join(f"{k} ×{v}" for k, v in sorted(summary["block_types"].items()))
    log.info("GGUF written: %s (%d bytes; %s)", out, summary["file_bytes"],
             f"{types}: {summary['bpw']:.4f} bits per linear weight" if types else "float")
    return summary

"""What a checkpoint says about itself, checked before it is used.

* The manifest (``manifest.json``, format 4): the sha256 of every file that decides how the weights decode
  (tensor shards, quant_config.json, config.json, generation config, tokenizer files, chat template). A file
  listed there that is missing or changed, or a decoding-relevant file that is not listed, refuses the folder.
  The run's report, recipe and plots are outside it (they describe the run; they do not change the model).
* The records against the tensors: each quantized linear's record in quant_config.json (shape, group size,
  symmetry, bits, bits per weight) must match its stored tensors (bit map, packed codes, scales, zeros, kept
  columns, permutation), and every floating-point tensor must be finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.builtin import sha256_file
from ..quant.pack import stored_bits
from ..quant.result import FP16_BITS
from ..tensorio import MANIFEST, all_finite

# written beside the model but not part of it: they describe the run (or are the manifest itself)
OUTSIDE = frozenset({MANIFEST, "report.json", "recipe.yaml", "progress.json"})
# what can change how a model decodes: weights, configs, tokenizer and vocabulary files, chat templates, code
DECODING_SUFFIXES = (".safetensors", ".json", ".jinja", ".model", ".txt", ".py", ".tiktoken", ".bin", ".pt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PACKED = {"group_bits", "scales", "scale_codes", "scale_base", "zeros", "zeros_b4", "fp16_cols", "perm",
           "rot_signs", "rot_factor"}


def covered(folder: Path) -> list[str]:
    """The files of ``folder`` the manifest covers: those that can change decoding (by suffix, or a tokenizer
    file), not the run's own records, hidden temporaries or documents such as a README."""
    return sorted(f.name for f in Path(folder).iterdir()
                  if f.is_file() and not f.name.startswith(".") and f.name not in OUTSIDE
                  and (f.name.endswith(DECODING_SUFFIXES) or f.name.startswith("tokenizer")))


def write_manifest(folder: Path, known: dict[str, str]) -> None:
    """``manifest.json`` over the covered files (``known``: checksums already computed, by file name)."""
    files = {name: known.get(name) or sha256_file(Path(folder) / name) for name in covered(folder)}
    (Path(folder) / MANIFEST).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2))


def read_manifest(folder: Path) -> dict[str, str] | None:
    f = Path(folder) / MANIFEST
    if not f.is_file():
        return None
    try:
        files = json.loads(f.read_text())["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise ValueError("'files' is not a map of file names to checksums")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f} is unreadable ({e}); the checkpoint is damaged: re-save it") from e
    return files


def verify_manifest(folder: Path, files: dict[str, str], skip: tuple[str, ...] = ()) -> None:
    """Every covered file is listed and matches; every listed file exists (``skip``: names verified elsewhere,
    such as the tensor shards that are hashed while they are read)."""
    folder = Path(folder)
    root = folder.resolve()
    for f in folder.iterdir():
        if f.is_symlink() and not f.resolve().is_relative_to(root):
            raise CheckpointError(f"{f.name} is a symlink to {f.resolve()}, outside {folder}; refusing to read it")
    extra = [n for n in covered(folder) if n not in files]
    if extra:
        raise CheckpointError(f"{folder} holds {', '.join(extra[:3])} that its {MANIFEST} does not list: a file "
                              "that changes decoding was added after the save; remove it or re-save the checkpoint")
    for name, want in files.items():
        f = folder / name
        if Path(name).name != name:
            raise CheckpointError(f"{folder}/{MANIFEST} names {name!r}, not a file of the folder; refusing it")
        if not f.is_file():
            raise CheckpointError(f"{folder} is missing {name} (listed in its {MANIFEST}); the checkpoint is "
                                  "incomplete")
        if name not in skip and sha256_file(f) != want:
            raise CheckpointError(f"{f} does not match its checksum in {MANIFEST}: it was modified or is damaged; "
                                  "re-save or re-download the checkpoint")


def torch_dtype(qc: dict, where: Path | str) -> torch.dtype:
    """The model dtype quant_config.json records (required from format 4 on; float32 before)."""
    if "torch_dtype" not in qc and qc.get("format_version", 0) >= 4:
        raise CheckpointError(f"{where}: quant_config.json records no torch_dtype (format 4 always does); the "
                              "checkpoint is damaged or was edited (re-save it)")
    name = qc.get("torch_dtype", "float32")
    if name not in DTYPES:
        raise CheckpointError(f"{where}: torch_dtype {name!r} is not one of {', '.join(DTYPES)}; the checkpoint's "
                              "quant_config.json is damaged")
    return DTYPES[name]


def _fail(where, name: str, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: quantized module {name} {why}; the checkpoint is damaged or was edited "
                           "(re-save it)")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_packed(where, name: str, spec: dict, own: dict[str, torch.Tensor]) -> None:
    """A quantized linear's record (``spec``) against its tensors (``own``, names without the module path)."""
    n, m, g = spec.get("in_features"), spec.get("out_features"), spec.get("group_size")
    if not (_positive_int(n) and _positive_int(m) and _positive_int(g)) or n % g:
        raise _fail(where, name, f"has in_features={n!r}, out_features={m!r}, group_size={g!r} (positive "
                                 "integers, the group size dividing in_features)")
    if not isinstance(spec.get("sym"), bool) or not isinstance(spec.get("rotation_order", 0), int):
        raise _fail(where, name, "has a malformed sym / rotation_order record")
    if "bias" in spec and bool(spec["bias"]) != ("bias" in own):
        raise _fail(where, name, f"records bias={spec['bias']} but {'has' if 'bias' in own else 'has no'} bias tensor")
    unknown = [k for k in own if k not in _PACKED and k != "bias" and not k.startswith("qweight_b")]
    if unknown:
        raise _fail(where, name, f"has unexpected tensors {unknown[:3]}")
    gb = own.get("group_bits")
    if gb is None or gb.dtype != torch.uint8 or tuple(gb.shape) != (n // g,):
        raise _fail(where, name, f"has no uint8 bit map of in_features / group_size = {n} / {g} groups")
    bits = sorted(set(gb.tolist()))
    if any(not (1 <= b <= 8 or b == FP16_BITS) for b in bits):
        raise _fail(where, name, f"stores bit-widths {bits} (1..8 or {FP16_BITS})")
    if sorted(spec.get("bits") or []) != bits:
        raise _fail(where, name, f"records bits {spec.get('bits')} but its bit map holds {bits}")
    _check_codes(where, name, own, gb, m, g)
    _check_groups(where, name, own, spec["sym"], m, int((gb < FP16_BITS).sum()), int((gb == FP16_BITS).sum()) * g)
    perm = own.get("perm")
    if perm is not None and (tuple(perm.shape) != (n,) or not torch.equal(perm.long().sort().values,
                                                                          torch.arange(n))):
        raise _fail(where, name, f"has a column order that is not a permutation of its {n} inputs")
    weights = {k: v for k, v in own.items() if k != "bias"}
    bpw = stored_bits(weights) / (n * m)
    recorded = spec.get("bpw")
    if not isinstance(recorded, (int, float)) or not math.isclose(bpw, recorded, rel_tol=0, abs_tol=1e-5):
        raise _fail(where, name, f"records {recorded!r} bits per weight but its tensors hold {bpw:.6f}")


def _check_codes(where, name: str, own: dict, gb: torch.Tensor, m: int, g: int) -> None:
    present = {int(k[len("qweight_b"):]) for k in own if k.startswith("qweight_b") and k[9:].isdigit()}
    wanted = {b for b in gb.tolist() if b != FP16_BITS}
    if present != wanted or len(present) != sum(k.startswith("qweight_b") for k in own):
        raise _fail(where, name, f"has packed codes for bit-widths {sorted(present)} but its bit map uses "
                                 f"{sorted(wanted)}")
    for b in wanted:
        count = int((gb == b).sum()) * g
        q = own[f"qweight_b{b}"]
        if q.dtype != torch.int32 or tuple(q.shape) != (m, -(-count // 32) * b):
            raise _fail(where, name, f"has qweight_b{b} of shape {tuple(q.shape)} ({q.dtype}); "
                                     f"{m} x {-(-count // 32) * b} int32 expected")


def _check_groups(where, name: str, own: dict, sym: bool, m: int, nq: int, fp_cols: int) -> None:
    shapes = {"scales": (m, nq), "scale_codes": (m, nq), "scale_base": (m,), "zeros": (m, nq),
              "zeros_b4": (1, -(-(m * nq) // 32) * 4), "fp16_cols": (m, fp_cols)}
    for k, want in shapes.items():
        if k in own and tuple(own[k].shape) != want:
            raise _fail(where, name, f"has {k} of shape {tuple(own[k].shape)}; {want} expected")
    if nq and not ("scales" in own or {"scale_codes", "scale_base"} <= set(own)):
        raise _fail(where, name, "has no scales")
    if nq and not sym and not ("zeros" in own or "zeros_b4" in own):
        raise _fail(where, name, "is asymmetric but has no zero points")
    if sym and ("zeros" in own or "zeros_b4" in own):
        raise _fail(where, name, "is recorded symmetric but stores zero points")
    if fp_cols and "fp16_cols" not in own:
        raise _fail(where, name, f"keeps {fp_cols} columns in float16 but does not store them")


# beyond anything a trained model holds: squared and summed over a hidden dimension, float32 overflows
MAX_MAGNITUDE = 1e15


def check_finite(where, tensors: dict[str, torch.Tensor]) -> None:
    """Every floating-point tensor finite and below `MAX_MAGNITUDE` (one pass: NaN and inf fail the comparison
    too); a NaN scale would make every output NaN, a 1e36 embedding every normalised hidden state zero."""
    bad = [k for k, t in tensors.items() if not all_finite(t, MAX_MAGNITUDE)]
    if bad:
        raise CheckpointError(f"{where}: tensors {bad[:3]} hold NaN, inf or values beyond {MAX_MAGNITUDE:g}; the "
                              "checkpoint is damaged or was edited (re-save it)")


def check_layout(where, model: torch.nn.Module, modules: dict[str, dict], tensors: dict[str, torch.Tensor],
                 tied: bool = False, stored: dict[str, torch.dtype] | None = None) -> None:
    """The records and tensors against the model config.json describes (a meta-device skeleton): every recorded
    module is a linear of that shape there, every other tensor has its place and shape, nothing is missing.
    ``stored``: the file's dtype of tensors converted as they were read (`read_tensors`)."""
    full = model.state_dict()
    state = {k: tuple(v.shape) for k, v in full.items()}
    for name, spec in modules.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: quant_config.json records module {name}, which the model of "
                                  "config.json does not have; the checkpoint is damaged or was edited") from None
        if not isinstance(lin, torch.nn.Linear) or (lin.in_features, lin.out_features) != (
                spec.get("in_features"), spec.get("out_features")):
            raise _fail(where, name, f"records {spec.get('out_features')} x {spec.get('in_features')} where "
                                     "config.json's model has another layer")
        state.pop(name + ".weight", None)  # (a bias stays: the skeleton's bias must be in the tensors)
    owned = tuple(name + "." for name in modules)
    unexpected = [k for k in tensors if not k.startswith(owned) and k not in state]
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensors {sorted(unexpected)[:3]} (no place for them in the "
                              "model config.json describes, or their module's record is gone); the checkpoint is "
                              "damaged or was edited")
    wrong = [k for k, t in tensors.items() if k in state and tuple(t.shape) != state[k]]
    if wrong:
        raise CheckpointError(f"{where}: tensors {sorted(wrong)[:3]} do not fit the model config.json describes "
                              f"({tuple(tensors[wrong[0]].shape)} vs {state[wrong[0]]}); the checkpoint is damaged "
                              "or was edited")
    stored = stored or {}
    cast = [k for k, t in tensors.items() if k in state and stored.get(k, t.dtype) != full[k].dtype]
    if cast:
        have = stored.get(cast[0], tensors[cast[0]].dtype)
        raise CheckpointError(f"{where}: tensors {sorted(cast)[:3]} are {have}, the model's {full[cast[0]].dtype}; "
                              "the checkpoint is damaged or was edited (re-save it)")
    missing = [k for k in state if k not in tensors and not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise CheckpointError(f"{where}: tensors missing from the checkpoint: {sorted(missing)[:3]}")

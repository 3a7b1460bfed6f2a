"""A hostile new user on tiny-llama through the real CLI (``python -m flexquant`` in a subprocess, HF_HUB_OFFLINE=1,
a temporary work folder as cwd): bad arguments, unusable output folders, text that is not text, broken model folders,
checkpoints and GPTQ exports tampered with (with and without recomputed checksums), saves killed part-way (a signal
at a time, or once a temporary piece shows; or a SIGKILL from inside right before one rename: PRELUDE).
``python -m bench.adversarial [--quick] [--out bench/results] [--name adversarial] [--only 'A|B'] [--timeout S]``

Fine: clean-error (the last stderr line is the only `flexquant: error:` line, exit 2, or `flexquant: unexpected error:`,
exit 1), ok-control (a command that must work did), accepted (exit 0 where a refusal is not required: an edit no check
can tell from a real checkpoint once every checksum is recomputed, or a file that decodes nothing; the output is still
checked), survived-kill. Failures: traceback, wrong-result-exit-0, leftovers (new hidden entries, or any new entry
after a failure), lost-checkpoint, control-failed, messy-error (a failure without that line), timeout, harness-error."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
FQ, TIMEOUT, TRACEBACK = [sys.executable, "-m", "flexquant"], [60], "Traceback (most recent call last)"
CLASSES = ("clean-error", "ok-control", "accepted", "survived-kill", "traceback", "wrong-result-exit-0", "leftovers",
           "lost-checkpoint", "control-failed", "messy-error", "timeout", "harness-error")
MACROS = {"$EVAL": "eval q --windows 1 --seqlen 64 --json -q", "$EXPORT": "export q --format gptq --out e",
          "$GEN": "generate q --prompt hello --max-new-tokens 4 -q", "$LONG": "'" + "a " * 10000 + "'",
          "$RTN": "quantize tiny-llama --method rtn --out o -q",
          "$GPTQ": "quantize tiny-llama --method gptq --nsamples 4 --seqlen 32 --out o -q"}
PRELUDE = """import fnmatch, os, runpy, signal, sys; hook, real = sys.argv.pop(1), os.replace
if hook == "pipe": r, w = os.pipe(); os.dup2(w, 1); os.close(r)  # stdout: a pipe whose reader is gone (`| head -1`)
def replace(a, b, *k, **kw):  # rename:PATTERN: a SIGKILL right before renaming a folder named PATTERN
    if fnmatch.fnmatch(os.path.basename(str(a)), hook[7:]): os.kill(os.getpid(), signal.SIGKILL)
    return real(a, b, *k, **kw)
os.replace, sys.argv[0] = replace, "flexquant"; runpy.run_module("flexquant", run_name="__main__", alter_sys=True)"""
RUN = lambda argv, hook="": FQ + argv if not hook else [sys.executable, "-c", PRELUDE, hook, *argv]  # -m flexquant
BLOBS = {"@bin": bytes(range(256)) * 64, "@pickle": b"\x80\x04junk", "@nul": b"\x00" * 5000, "@empty": b"",
         "@utf16": ("some words " * 300).encode("utf-16"), "@ws": b" \n\t" * 500}

@dataclass
class Case:
    name: str
    kind: str
    argv: list[str]            # after `flexquant`; {rtn} is the shared RTN checkpoint
    expect: str = "error"      # error: must be refused | ok: must work | either: exit 0 allowed, its output checked
    prep: str = ""             # steps run in the work folder first: "op args; op args" (STEPS)
    kill: tuple | None = None  # (signal, seconds | "partial"/"tmp"/"old": once .T.<it> shows | "rename:..." (PRELUDE))
    hook: str = ""             # PRELUDE's hook: "pipe" | "rename:PATTERN"

def cmd(s: str, folder: str = "q") -> list[str]:
    for k in sorted(MACROS, key=len, reverse=True):
        s = s.replace(k, MACROS[k])
    return [folder if a == "q" else a for a in shlex.split(s)]

# ----- prep steps -----
def _p(w: Path, to: str, name: str) -> Path:
    return sorted((w / to).glob("model-*.safetensors"))[0] if name == "shard" else w / to / name

def step_json(w, s, name, path, value, to="q"):  # set a field (a/b/c; *: the first key, sorted) to JSON, or "del"
    p, keys = w / to / name, path.split("/")
    data = node = json.loads(p.read_text())
    for i, k in enumerate(keys):
        keys[i] = sorted(node)[0] if k == "*" else k
        node = node[keys[i]] if i < len(keys) - 1 else node
    node.pop(keys[-1], None) if value == "del" else node.__setitem__(keys[-1], json.loads(value))
    p.write_text(json.dumps(data, indent=2))

def step_reseal(w, s, to="q"):  # an attacker who knows the format: every checksum recomputed after the edit
    d, sha = w / to, lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    for name, key in (("quant_config.json", "checksums"), ("manifest.json", "files")):
        data = json.loads((d / name).read_text())
        if isinstance(data.get(key), dict):
            data[key] = {n: sha(d / n) for n in data[key] if (d / n).is_file()}
            (d / name).write_text(json.dumps(data, indent=2))

def _tensor_op(op: str, t):
    import torch
    t, big = t.clone(), 6e4 if t.dtype == torch.float16 else 3e38
    if op in ("nan", "inf", "dup", "oob"):  # one element: NaN, inf; a permutation: a repeated or huge index
        i, v = (0, float(op)) if op in ("nan", "inf") else (1, t.view(-1)[0] if op == "dup" else 30000)
        t.view(-1)[i] = v
        return t
    if op in ("float32", "float16", "bfloat16", "int8", "int64"):
        return t.to(getattr(torch, op))
    return {"big": lambda: torch.full_like(t, big), "zero": lambda: torch.zeros_like(t), "neg": lambda: -t,
            "nine": lambda: torch.full_like(t, 9), "max": lambda: torch.full_like(t, torch.iinfo(t.dtype).max),
            "shape": lambda: t[:-1], "transpose": lambda: t.reshape(t.shape[::-1]).contiguous()}[op]()

def step_tensor(w, s, sel, op, to="q"):  # edit, delete or add an .extra beside the first tensor ending with sel
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    for shard in sorted((w / to).glob("*.safetensors")):
        with safe_open(shard, "pt") as h:
            meta, hit = h.metadata(), sorted(k for k in h.keys() if k.endswith(sel))
        if hit:
            sd, k = load_file(shard), hit[0]
            new = {k.rsplit(".", 1)[0] + ".extra": torch.zeros(3)} if op == "extra" else {} if op == "delete" else \
                {k: _tensor_op(op, sd[k])}
            sd = {n: t for n, t in {**sd, **new}.items() if not (op == "delete" and n == k)}
            return save_file(sd, shard, metadata=meta)
    raise LookupError(f"no tensor ends with {sel}")

def step_file(w, s, op, name, to="q"):  # delete truncate flip flip-head garbage link-out link-passwd dir ("shard")
    p = _p(w, to, name)
    data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
    if op == "link-out":
        (w / "outside").mkdir(exist_ok=True)
        shutil.move(p, w / "outside" / p.name)
        return p.symlink_to(w / "outside" / p.name)
    p.unlink()
    if op in ("truncate", "flip", "flip-head", "garbage"):
        b = bytearray({"truncate": data[: len(data) // 2], "garbage": b"{not json \x00\xff"}.get(op, data))
        if op.startswith("flip"):
            b[12 if op == "flip-head" else len(b) * 3 // 4] ^= 0xFF
        p.write_bytes(bytes(b))
    elif op in ("link-passwd", "dir"):
        p.symlink_to("/etc/passwd") if op == "link-passwd" else p.mkdir()

def step_index(w, s, pattern):  # the weights gone, an index naming ROOT/outside/'s copy: ../../outside/... from g
    from safetensors import safe_open
    with safe_open(s["gexp"] / "model.safetensors", "pt") as h:
        idx = {"metadata": {}, "weight_map": {k: pattern.format(root=s["root"]) for k in h.keys()}}
    (w / "g" / "model.safetensors").unlink()
    (w / "g" / "model.safetensors.index.json").write_text(json.dumps(idx))

STEPS = {"cp": lambda w, s, key="rtn", to="q": shutil.copytree(s[key], w / to, symlinks=True),
         "mkdir": lambda w, s, name, mode="755": (w / name).mkdir(mode=int(mode, 8)),
         "symlink": lambda w, s, name, target: (w / name).symlink_to(target.format(w=w)),
         "copy": lambda w, s, src, dst: shutil.copy(_p(w, "q", src), w / dst),
         "write": lambda w, s, name, data: (os.makedirs((w / name).parent, exist_ok=True),
                                            (w / name).write_bytes(BLOBS.get(data, data.encode()))),
         "qcfg": lambda w, s, k, v: [step_json(w, s, n, p, v, "g") for n, p in  # quantize_config.json and config.json
                                    (("quantize_config.json", k), ("config.json", f"quantization_config/{k}"))],
         "json": step_json, "reseal": step_reseal, "tensor": step_tensor, "file": step_file, "index": step_index}

def apply(prep: str, w: Path, s: dict) -> None:
    for part in filter(None, (x.strip() for x in prep.split(";"))):
        op, *args = shlex.split(part)
        STEPS[op](w, s, *args)

# ----- the catalog -----
BAD_ARGS = {  # base command (macro) -> bad values; a base on q gets the checkpoint copied first
    "$RTN": "--eval-windows -1|--eval-windows x|--bits 0|--bits 5|--group-size 0|"
    "--group-size 7|--group-size 100000|--method nope|--method ''|--max-memory lots|--store-dtype "
    "int8|--device tpu|--device cuda|--seed x|--stream maybe|--recipe missing.yaml|--bpw 3|"
    "--no-such-flag|--scale-bits 4",
    "$GPTQ": "--nsamples 0|--seqlen 0|--seqlen -1|--seqlen 4200|--seqlen 100000|--batch-size 0|"
    "--damp -1|--damp 2|--damp nan|--block-size 0|--calib missing.txt|--calib ''",
    "$EVAL": "--windows 0|--windows -3|--windows x|--seqlen 0|--seqlen 1|--seqlen -1|--seqlen 8192|"
    "--seqlen 4097|--text missing.txt|--text ''|--reference missing|--kernel nope|--device tpu|--lm-batch-size 0|"
    "--limit -1|--num-fewshot -1|--tasks ''|--tasks no_such_task_xyz|--include-path missing",
    "$GEN": "--prompt ''|--prompt '   '|--max-new-tokens 0|--max-new-tokens -1|--max-new-tokens x|"
    "--max-new-tokens 100000",
    "$EXPORT": "--format nope|--dtype int8|--gptq-format v9|--online-rotation x"}
OUTS = ("a file --overwrite|f --overwrite|error|write f x", "below a file|f/sub|error|write f x",
        "a non-checkpoint folder --overwrite|mine --overwrite|error|write mine/thesis.tex keep",
        "an existing folder without --overwrite|d|error|write d/a.txt x", "''|''|error|",
        "/proc/flexquant-out|/proc/flexquant-out|error|", "a dangling symlink|ln|error|symlink ln {w}/nowhere",
        "in a read-only folder (root ignores the mode)|ro/o|either|mkdir ro 555")
TEXTS = {"binary": "write t.bin @bin", "empty": "write t.bin @empty", "whitespace": "write t.bin @ws",
         "one byte": "write t.bin a", "NUL bytes": "write t.bin @nul", "UTF-16": "write t.bin @utf16",
         "folder of binary": "write t.bin/x.txt @bin", "empty folder": "mkdir t.bin", "/dev/null": ""}
MODEL_EDITS = (  # what|edit (the +: also with --stream off and through eval)
    "missing tensor+|tensor up_proj.weight delete m|extra tensor+|tensor up_proj.weight extra m|misshaped tensor+|"
    "tensor up_proj.weight shape m|transposed tensor|tensor up_proj.weight transpose m|NaN weight+|"
    "tensor up_proj.weight nan m|inf weight|tensor up_proj.weight inf m|3e38 weights+|tensor o_proj.weight big m|"
    "int8 weight|tensor up_proj.weight int8 m|NaN norm weight|tensor model.norm.weight nan m|missing embedding|"
    "tensor embed_tokens.weight delete m|config.json deleted|file delete config.json m|config.json garbage|"
    "file garbage config.json m|num_hidden_layers 3|json config.json num_hidden_layers 3 m|num_hidden_layers 1|"
    "json config.json num_hidden_layers 1 m|hidden_size 64|json config.json hidden_size 64 m|vocab_size 300|"
    "json config.json vocab_size 300 m|weights truncated|file truncate model.safetensors m|weights deleted|"
    "file delete model.safetensors m|weights header byte-flipped|file flip-head model.safetensors m|"
    "weights a symlink to /etc/passwd|file link-passwd model.safetensors m|tokenizer.json deleted|"
    "file delete tokenizer.json m")
# "path=value=S": S=1, a cross-check can see the edit even with every checksum recomputed (it must be refused);
# S=0, a consistent checkpoint could say it (with recomputed checksums exit 0 is allowed if the output is finite).
JSON_EDITS = {
    "quant_config.json": "format_version=3=0|format_version=99=1|library_version=\"9.9\"=0|torch_dtype=\"float16\"=0|"
    "torch_dtype=\"int8\"=1|torch_dtype=del=1|checksums={}=0|checksums=del=0|quant_config/grid/bits=2=0|"
    "quant_config/method=\"gptq\"=0|summary/bpw=1.0=0|modules/*/in_features=64=1|modules/*/out_features=64=1|"
    "modules/*/group_size=32=1|modules/*/sym=true=1|modules/*/bias=true=1|modules/*/bits=[8]=1|modules/*/bits=[3]=1|"
    "modules/*/bpw=2.0=1|modules/*/rotation_order=1=1|modules/*=del=1|modules/model.layers.0.x_proj={}=1|modules={}=1",
    "config.json": "attention_bias=true=1|attention_dropout=0.5=0|bos_token_id=999=0|eos_token_id=999=0|head_dim=64=1|"
    "hidden_act=\"gelu\"=0|hidden_act=\"nope\"=1|hidden_size=64=1|initializer_range=9.0=0|intermediate_size=512=1|"
    "max_position_embeddings=16=0|mlp_bias=true=1|model_type=\"bert\"=1|num_attention_heads=3=1|"
    "num_hidden_layers=1=1|num_hidden_layers=3=1|num_hidden_layers=0=1|num_key_value_heads=4=1|pad_token_id=999=0|"
    "pretraining_tp=2=0|rms_norm_eps=0.5=0|rms_norm_eps=-1.0=0|rope_parameters/rope_theta=500.0=0|"
    "rope_parameters/rope_theta=0.0=0|rope_parameters/rope_theta=-1.0=0|rope_parameters/rope_theta=\"abc\"=1|"
    "rope_parameters/rope_type=\"yarn\"=0|rope_theta=500.0=0|tie_word_embeddings=false=1|"
    "transformers_version=\"0.0.1\"=0|use_cache=true=0|vocab_size=300=1|torch_dtype=\"float16\"=0|dtype=\"int8\"=1",
    "generation_config.json": "bos_token_id=5=0|eos_token_id=5=0|pad_token_id=999=0|_from_model_config=false=0|"
    "output_attentions=true=0|output_hidden_states=true=0|transformers_version=\"0.0.1\"=0|use_cache=false=0|"
    "max_new_tokens=-5=0|temperature=9.0=0",
    "tokenizer_config.json": "backend=\"nope\"=0|bos_token=\"<x>\"=0|eos_token=\"<x>\"=0|model_max_length=8=0|"
    "pad_token=\"<x>\"=0|tokenizer_class=\"Nope\"=0"}
TENSOR_EDITS = (".scales nan 1|.scales inf 1|.scales zero 0|.scales big 0|.scales neg 0|.scales float32 1|"
                ".scales shape 1|.scales delete 1|.scales extra 1|.zeros max 0|.zeros int64 1|.qweight_b4 int64 1|"
                ".qweight_b4 shape 1|.qweight_b4 transpose 1|.group_bits nine 1|input_layernorm.weight nan 1|"
                "input_layernorm.weight zero 0|input_layernorm.weight float16 0|model.norm.weight inf 1|"
                "embed_tokens.weight nan 1|embed_tokens.weight big 1|embed_tokens.weight bfloat16 0|"
                "embed_tokens.weight delete 1")
FILE_EXTRAS = (
    "config.json a symlink to /etc/passwd|error|file link-passwd config.json|a folder for quant_config.json|error|"
    "file dir quant_config.json|an unlisted shard added|error|copy shard q/model-9-of-9.safetensors|"
    "pytorch_model.bin added|either|write q/pytorch_model.bin @pickle|special_tokens_map.json added|error|"
    "write q/special_tokens_map.json '{\"bos_token\": \"<x>\"}'|a shard moved outside, symlinked|either|"
    "file link-out shard")
FILES = ("config.json", "quant_config.json", "manifest.json", "model.safetensors.index.json", "shard", "tokenizer.json",
         "tokenizer_config.json", "generation_config.json")
GPTQ_EDITS = (  # a GPTQ export has no checksums: what|expect|prep (qcfg: quantize_config.json and config.json)
    "bits 8|error|qcfg bits 8|bits 3|error|qcfg bits 3|group_size 32|error|qcfg group_size 32|group_size 0|error|"
    "qcfg group_size 0|group_size -1|either|qcfg group_size -1|sym true|either|qcfg sym true|desc_act true|either|"
    "qcfg desc_act true|checkpoint_format gptq_v2|either|qcfg checkpoint_format '\"gptq_v2\"'|quant_method awq|error|"
    "qcfg quant_method '\"awq\"'|quantization_config removed|either|json config.json quantization_config del g|"
    "config.json garbage|error|file garbage config.json g|model.safetensors a symlink outside|error|"
    "file link-out model.safetensors g|tokenizer.json a symlink to /etc/passwd|error|"
    "file link-passwd tokenizer.json g|pytorch_model.bin beside|either|write g/pytorch_model.bin @pickle|"
    "only pytorch_model.bin|error|file delete model.safetensors g; write g/pytorch_model.bin @pickle|NaN scale|error|"
    "tensor .scales nan g|qweight misshaped|error|tensor .qweight shape g|g_idx out of range|error|"
    "tensor .g_idx oob g|qzeros deleted|error|tensor .qzeros delete g|extra tensor|error|tensor .qweight extra g|"
    "weights truncated|error|file truncate model.safetensors g|index naming ../../outside/model.safetensors|error|"
    "index ../../outside/model.safetensors|index naming an absolute path|error|index {root}/outside/model.safetensors")
SPECS = r"""kind|expect|name|command|prep: the cases that are not a family
args|error|quantize without --out|quantize tiny-llama --method rtn|
args|error|quantize a hub id offline|quantize nobody/nothing --out o -q|
args|error|quantize --recipe garbage|$RTN --recipe r.yaml|write r.yaml 'grid: [1, 2\n::'
args|ok|quantize --recipe a checkpoint's recipe.yaml|quantize --recipe q/recipe.yaml --out o -q|cp
args|error|generate without --prompt|generate q|cp
args|either|report --out below a missing folder|report q --out no/such/r.md|cp
args|error|report --out a folder|report q --out d|cp; mkdir d
args|error|no command||
args|error|unknown command|nope|
args|either|generate a prompt of 20000 characters|$GEN --prompt $LONG|cp
out|error|quantize a checkpoint --out itself --overwrite|quantize q --method rtn --out q --overwrite -q|cp
out|error|quantize a checkpoint as the model|quantize q --method rtn --out o -q|cp
out|error|quantize a model folder --out itself --overwrite|quantize m --method rtn --out m --overwrite -q|cp fp m
out|error|export --out its own source --overwrite|export q --format gptq --out q --overwrite|cp
out|either|export --out a folder inside its source|export q --format gptq --out q/e|cp
text|either|quantize --calib a checkpoint folder|$GPTQ --calib q|cp
model|error|quantize --method gptq a model folder: 3e38 weights|quantize m --method gptq --nsamples 4 --seqlen 32 \
--out o -q|cp fp m; tensor o_proj.weight big m
tamper-file|either|report of a damaged report.json|report q|cp; file garbage report.json
tamper-file|ok|info of a damaged report.json|info q|cp; file garbage report.json
tamper-file|error|no quant_config.json, no manifest.json|$EVAL|cp; file delete quant_config.json; \
file delete manifest.json
tamper-tensor|error|generate with a NaN scale (resealed)|$GEN|cp; tensor .scales nan; reseal
tamper-tensor|error|export with a NaN scale (resealed)|$EXPORT|cp; tensor .scales nan; reseal
interop|either|export of a checkpoint with a stray pytorch_model.bin|$EXPORT|cp; write q/pytorch_model.bin @pickle
interop|either|export of a checkpoint with a stray optimizer.pt|$EXPORT|cp; write q/optimizer.pt @pickle
"""
CONTROLS = ("info q --json|cp|$EVAL|cp|$GEN|cp|$EXPORT -q|cp|export q --format compressed-tensors --out e -q|cp|"
            "$EVAL@g|cp gexp g|$EVAL@gptq|cp gptq gptq|report q -q|cp|$EVAL@m|cp fp m|$RTN||methods||"
            "export q --format gptq --out g --overwrite -q|cp; cp gexp g")

def _family_cases() -> list[Case]:
    cases = [Case(f"{cmd(base)[0]} {a}", "args", cmd(f"{base} {a}"), prep="" if "tiny-llama" in
                  cmd(base) else "cp") for base, bad in BAD_ARGS.items() for a in bad.split("|")]
    places = (("a missing folder", "missing", ""), ("an empty folder", "d", "mkdir d"), ("a file", "f", "write f hi"))
    cases += [Case(f"{c.split()[0]} of {what}", "args", [c.split()[0], path, *c.split()[1:]], prep=prep)
              for c in ("eval", "info", "generate --prompt hi", "export --format gptq --out e", "report")
              for what, path, prep in places]
    cases += [Case(f"{v} --out {what}", "out", cmd(f"{base} {out}"), expect, pre + prep)
              for v, base, pre in (("quantize", "quantize tiny-llama --method rtn -q --out", ""),
                                   ("export", "export q --format gptq --out", "cp;"))
              for what, out, expect, prep in (o.split("|") for o in OUTS)]
    cases += [Case(f"{c} {what}", "text", cmd(f"{base} {c} {'t.bin' if prep else '/dev/null'}"), prep=p + prep)
              for what, prep in TEXTS.items() for c, base, p in (("--calib", "$GPTQ", ""), ("--text", "$EVAL", "cp;"))]
    m, more = MODEL_EDITS.split("|"), [("quantize --stream off", "$RTN --stream off"), ("eval", "$EVAL")]
    cases += [Case(f"model: {v} a model folder: {what.rstrip('+')}", "model", [v.split()[0], "m", *cmd(base)[2:]],
                   prep=f"cp fp m; {edit}") for what, edit in zip(m[::2], m[1::2])
              for v, base in [("quantize", "$RTN")] + more * what.endswith("+")]
    return cases + _kills()

def _kills() -> list[Case]:  # saves over a good folder (or a first save) signalled at a time or once .T.<piece> shows
    rtn, ex = "$RTN --overwrite", "export {rtn} --format gptq --out g --overwrite -q"
    at = lambda t, p: (p, *(f"rename:{n}" for n in (f".{t}.{p}*", t, f".{t}.new-*")), "old", 0.5, 1.0, 2.0, 3.0, 5.0)
    runs = [("quantize", rtn, "cp", at("q", "partial")), ("quantize gptq", "$GPTQ --overwrite", "cp", (4.0, "partial")),
            ("first save", "$RTN", "", ("partial",)), ("export", ex, "cp gexp g", at("g", "tmp"))]
    kills = [(f"SIGKILL {v} at {w}", c, p, ("SIGKILL", w)) for v, c, p, ws in runs for w in ws]
    kills += [(f"{sig} quantize at partial", rtn, "cp", (sig, "partial")) for sig in ("SIGINT", "SIGTERM")]
    return [Case(f"kill: {n}", "kill", ["q" if a == "o" else a for a in cmd(c)], "ok", p, k) for n, c, p, k in kills]

def _tamper_cases() -> list[Case]:
    cases, seen = _family_cases(), set()
    for name, edits in JSON_EDITS.items():
        for e in edits.split("|"):
            path, rest = e.split("=", 1)
            value, s = rest.rsplit("=", 1)
            what, edit = f"tamper-json: {name}: {path} = {value}", f"json {name} {path} {shlex.quote(value)}"
            argv = cmd("$GEN" if name == "generation_config.json" else "$EVAL")
            if (name, path) not in seen:  # unsealed: the first value of a field only (a checksum catches them all)
                cases.append(Case(what, "tamper-json", argv, "error", f"cp; {edit}"))
            seen.add((name, path))
            cases.append(Case(f"{what} (resealed)", "tamper-json", argv, "either" if s == "0" else "error",
                              f"cp; {edit}; reseal"))
    for sel, op, s in (e.split() for e in TENSOR_EDITS.split("|")):
        cases += [Case(f"tamper-tensor: *{sel} {op}{r}", "tamper-tensor", cmd("$EVAL"),
                       "either" if r and s == "0" else "error", f"cp; tensor {sel} {op}{'; reseal' if r else ''}")
                  for r in ("", " (resealed)")]
    cases += [Case(f"tamper-tensor: gptq checkpoint *.perm {op} (resealed)", "tamper-tensor", cmd("$EVAL"), "error",
                   f"cp gptq; tensor .perm {op}; reseal") for op in ("dup", "oob", "int64", "delete")]
    cases += [Case(f"tamper-file: {op} {name}", "tamper-file", cmd("$EVAL"), "error" if name in FILES else "either",
                   f"cp; file {op} {name}") for name in FILES + ("recipe.yaml", "report.json", "report.png")
              for op in (("delete", "truncate", "flip", "garbage") if name in FILES else ("delete", "garbage"))]
    for kind, table, pre, f in (("interop", GPTQ_EDITS, "cp gexp g", "g"), ("tamper-file", FILE_EXTRAS, "cp", "q")):
        g = table.split("|")
        cases += [Case(f"{kind}: {'gptq folder: ' * (f == 'g')}{what}", kind, cmd("$EVAL", f), expect, f"{pre}; {prep}")
                  for what, expect, prep in zip(g[::3], g[1::3], g[2::3])]
    return cases

def catalog() -> list[Case]:
    cases = _tamper_cases()
    for line in SPECS.replace("\\\n", "").splitlines()[1:]:
        kind, expect, name, argv, prep = line.split("|")
        argv, _, folder = argv.partition("@")
        cases.append(Case(name if kind in ("args", "out", "text") else f"{kind}: {name}", kind,
                          cmd(argv, folder or "q"), expect, prep))
    c = CONTROLS.split("|")
    cases += [Case(f"control: {a.replace('@', ' on ')}", "control", cmd(*a.split("@")), "ok", p)
              for a, p in zip(c[::2], c[1::2])]
    return cases + [Case("info --json into a pipe closed early", "args", cmd("info q --json"), "either", "cp",
                         hook="pipe")]

def quick_subset(cases: list[Case], n: int = 40) -> list[Case]:  # spread evenly over each kind, in proportion
    by = [[c for c in cases if c.kind == k] for k in dict.fromkeys(c.kind for c in cases)]
    return [k[j * len(k) // m] for k in by for m in [max(1, round(len(k) * n / len(cases)))] for j in range(m)]

# ----- running and judging -----
def call(argv: list[str], work: Path, hook: str = "") -> tuple[int | None, str, str, bool]:  # rc, err, out, timeout
    try:
        r = subprocess.run(RUN(argv, hook), cwd=work, env=ENV, capture_output=True, text=True, errors="replace",
                           timeout=TIMEOUT[0])
        return r.returncode, r.stderr, r.stdout, False
    except subprocess.TimeoutExpired as e:
        return None, (e.stderr or b"").decode(errors="replace"), (e.stdout or b"").decode(errors="replace"), True

def one_line(rc: int | None, err: str) -> bool:  # the last line: the only error line, its prefix fits the exit status
    lines = [ln for ln in err.splitlines() if ln.strip()]
    heads = [ln for ln in lines if ln.startswith(("flexquant: error:", "flexquant: unexpected error:"))]
    if rc == 141:  # stdout's reader left: a quiet exit, as a shell reports a command killed by SIGPIPE
        return not heads
    want = {2: "flexquant: error:", 1: "flexquant: unexpected error:", 130: "flexquant:"}.get(rc)
    return bool(want and lines and lines[-1].startswith(want) and len(heads) <= 1)

def classify(expect: str, rc: int | None, err: str, wrong: str | None = None, left=(), timed_out=False) -> str:
    """The class of an outcome; ``wrong``: what is wrong with its exit-0 result (None: nothing)."""
    if TRACEBACK in err or timed_out:
        return "traceback" if TRACEBACK in err else "timeout"
    if rc == 0 and (expect == "error" or (expect == "either" and wrong)):
        return "wrong-result-exit-0"
    if left or expect == "ok":
        return "leftovers" if left else "ok-control" if rc == 0 and not wrong else "control-failed"
    return "accepted" if rc == 0 else "clean-error" if one_line(rc, err) else "messy-error"

def classify_kill(had: bool, loads_rc, errs: list[str], rerun_rc, left, polite_ok: bool = True) -> str:
    """Kill: the folder that was there loads; the rerun works, leaves no pieces; INT/TERM: the one line, exit 130."""
    return "lost-checkpoint" if had and loads_rc != 0 else "traceback" if any(TRACEBACK in e for e in errs) else \
        "leftovers" if left else "control-failed" if rerun_rc != 0 else "survived-kill" if polite_ok else "messy-error"

def judge(argv: list[str], out: str, s: dict) -> tuple[float | None, str | None]:  # eval/info --json: (value, wrong)
    if "--json" not in argv or argv[0] not in ("eval", "info"):
        return None, None
    info = argv[0] == "info"
    try:
        v = float(json.loads(out if info else out.strip().splitlines()[-1])["bpw" if info else "perplexity"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None, "no result in the output"
    ok = abs(v - s["bpw"]) < 1e-3 if info else math.isfinite(v) and v > 0
    return v, None if ok else f"bpw {v:.4f} reported, {s['bpw']:.4f} verified" if info else f"perplexity {v}"

_entries = lambda work: set(os.listdir(work)) | {  # every top-level name, and every hidden path below
    os.path.relpath(os.path.join(r, n), work) for r, ds, fs in os.walk(work) for n in ds + fs if n.startswith(".")}
_last = lambda err: ([ln for ln in err.splitlines() if ln.strip()] or [""])[-1][:300]

def run_kill(case: Case, work: Path, argv: list[str]) -> dict:
    """Signal the save at its moment; then: does the target load (old or new)? Does the command, run again, work?"""
    (sig, when), t = case.kill, argv[argv.index("--out") + 1]
    had, pieces = (work / t).exists(), lambda: sorted(n for n in os.listdir(work) if n.startswith(f".{t}."))
    hook = when if str(when).startswith("rename:") else ""  # then the kill comes from inside, at that rename
    p = subprocess.Popen(RUN(argv, hook), cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    t0, fired = time.monotonic(), None
    while p.poll() is None and time.monotonic() - t0 < TIMEOUT[0] and fired is None:
        el = time.monotonic() - t0
        if el >= when if isinstance(when, float) else any(n.startswith(f".{t}.{when}") for n in os.listdir(work)):
            p.send_signal(getattr(signal, sig))
            fired = round(el, 3)
        time.sleep(0.01 if isinstance(when, float) or hook else 0.0005)
    if p.poll() is None and fired is None:
        p.kill()  # never signalled: it ran past the time limit
    err = p.communicate(timeout=TIMEOUT[0])[1]
    after, loads, rerun = pieces(), call(["info", t], work), call(argv, work)
    polite = sig == "SIGKILL" or fired is None or (p.returncode == 130 and one_line(130, err))
    return {"rc": p.returncode, "fired_at_s": fired, "pieces_after_kill": after, "stderr": err.splitlines()[-20:],
            "info_after_kill_rc": loads[0], "rerun_rc": rerun[0], "left": pieces(),
            "class": classify_kill(had, loads[0], [err, loads[1], rerun[1]], rerun[0], pieces(), polite),
            "last": f"signal at {fired} s (exit {p.returncode}: {_last(err) or 'no stderr'}); pieces {after}; then "
                    f"info: exit {loads[0]} {_last(loads[1])}; rerun: exit {rerun[0]} {_last(rerun[1])}"}

def run_case(case: Case, s: dict) -> dict:
    argv = [a.replace("{rtn}", str(s["rtn"])) for a in case.argv]
    rec = {"name": case.name, "kind": case.kind, "expect": case.expect, "prep": case.prep,
           "command": "flexquant " + shlex.join(argv) + (f" (hook {case.hook})" if case.hook else "")}
    work = Path(tempfile.mkdtemp(prefix="case-", dir=s["root"]))
    try:
        apply(case.prep, work, s)
        if case.kill:
            return {**rec, **run_kill(case, work, argv)}
        before = _entries(work)
        rc, err, out, timed_out = call(argv, work, case.hook)
        left = [n for n in sorted(_entries(work) - before) if n.startswith(".") or "/." in n or rc != 0]
        value, wrong = judge(argv, out, s) if rc == 0 and not case.hook else (None, None)
        return {**rec, "rc": rc, "stderr": err.splitlines()[-20:], "traceback": TRACEBACK in err,
                "one_line": one_line(rc, err), "left": left, "value": value, "wrong": wrong,
                "class": classify(case.expect, rc, err, wrong, left, timed_out),
                "last": wrong or _last(err) or (f"exit {rc}" + (f", value {value}" if value is not None else
                                                                  f": {out.strip()[-120:]}" if rc == 0 else ""))}
    except Exception as e:  # a case the harness could not build is reported, not fatal
        return {**rec, "class": "harness-error", "last": repr(e)}
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(work)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

def build_setup(root: Path) -> dict:  # tiny-llama: fp folder, RTN and GPTQ checkpoints, GPTQ export, baseline
    from flexquant.models.builtin import tiny_llama
    for x in tiny_llama():  # the model and its tokenizer
        x.save_pretrained(root / "fp")
    for argv in ("quantize tiny-llama --method rtn --out rtn -q", "export rtn --format gptq --out gexp -q",
                 "quantize tiny-llama --method gptq --nsamples 4 --seqlen 32 --out gptq -q"):
        rc, err, _, _ = call(shlex.split(argv), root)
        if rc != 0:
            raise SystemExit(f"setup failed: flexquant {argv}\n{err}")
    shutil.copytree(root / "gexp", root / "outside")  # the weights an index.json names from outside its folder
    s = {"root": root, **{k: root / k for k in ("fp", "rtn", "gptq", "gexp")}, "bpw": 0.0, "setup_s": time.time()}
    s["ppl"] = judge(cmd("$EVAL"), call(cmd("$EVAL", "rtn"), root)[2], s)[0]
    s["bpw"] = judge(["info", "--json"], call(["info", "rtn", "--json"], root)[2], s)[0]
    return {**s, "setup_s": time.time() - s["setup_s"]}

def write_results(records: list[dict], meta: dict, out: Path, name: str) -> str:
    n = Counter(x for r in records for x in ((r["kind"], r["class"]), ("all", r["class"])))
    kinds, cols = [*dict.fromkeys(r["kind"] for r in records), "all"], [c for c in CLASSES if n["all", c]]
    table = "\n".join(["| kind | cases | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"] + [
        f"| {k} | {sum(n[k, c] for c in cols)} | " + " | ".join(str(n[k, c]) for c in cols) + " |" for k in kinds])
    md = [f"# Adversarial run: {len(records)} cases", "", f"`{meta['command']}` · flexquant {meta['version']} · "
          f"commit {meta['commit']} · {meta['date']} · {meta['wall_s']:.0f} s · {meta['timeout_s']} s a command at "
          f"most · baseline: perplexity {meta['ppl']:.4f} (1 window of 64 tokens), bpw {meta['bpw']:.4f} · setup "
          f"{meta['setup_s']:.0f} s", "", __doc__.split("\n\n")[1], "", table]
    for title, pick in (("Not clean", lambda r: r["class"] not in CLASSES[:4]), ("Accepted: exit 0 where a refusal "
                        "was not required", lambda r: r["class"] == "accepted"), ("Clean, but exit 1 'unexpected "
                        "error'", lambda r: r["class"] == "clean-error" and r.get("rc") == 1)):
        rs = [r for r in records if pick(r)]
        md += ["", f"## {title} ({len(rs)})", ""]
        md += [f"- **{r['class']}** {r['name']}: `{r['command'][:240]}` → {r['last']}" for r in rs] or ["none"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "cases": records}, indent=1, default=str) + "\n")
    return table

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~40-case subset")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default="adversarial")
    ap.add_argument("--only", default="", help="only the cases whose name contains this (several: A|B|C)")
    ap.add_argument("--timeout", type=int, default=TIMEOUT[0], help="seconds per command")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # not ignored in the children (a background job's is)
    TIMEOUT[0], t0, root = args.timeout, time.time(), Path(tempfile.mkdtemp(prefix="flexquant-adversarial-"))
    cases = [c for c in (quick_subset(catalog()) if args.quick else catalog())
             if any(o in c.name for o in args.only.split("|"))]
    done: list[dict] = []
    try:
        s = build_setup(root)
        def one(c: Case) -> dict:
            done.append(run_case(c, s))
            print(f"[{len(done)}/{len(cases)}] {done[-1]['class']:<19} {c.name}", file=sys.stderr, flush=True)
            return done[-1]
        with ThreadPoolExecutor(max_workers=2) as pool:  # every case is a subprocess: 2 at a time
            records = list(pool.map(one, cases))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": "python -m bench.adversarial " + " ".join(sys.argv[1:] if argv is None else argv),
            "version": __import__("flexquant").__version__, "commit": git, "date": time.strftime("%Y-%m-%d %H:%M"),
            "wall_s": time.time() - t0, "timeout_s": TIMEOUT[0], **{k: s[k] for k in ("ppl", "bpw", "setup_s")}}
    print(write_results(records, meta, args.out, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())

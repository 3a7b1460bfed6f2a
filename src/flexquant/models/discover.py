"""A `ModelSpec` for a decoder family without a tested one, discovered when the model is loaded.

Any transformers CausalLM whose decoder blocks are an ``nn.ModuleList`` gets one: the block list (the usual paths,
else the ModuleList holding the most parameters), the embedding and head (``get_input_embeddings`` /
``get_output_embeddings``), and, from one forward pass of a skeleton of the model on a tiny random input:

* the linears of a block (its ``nn.Linear`` modules) in the order block 0 calls them, grouped by the tensor they
  read (the same tensor object or the same memory: q/k/v reading one norm's output; Falcon's fused q/k/v and its
  MLP reading the one norm of a parallel block). Values are not compared: two norms initialised alike would make
  different inputs look equal;
* the final norm: the module whose output is the head's input, run after the last block.

The skeleton is built from the config on the meta device; only block 0 and the small modules outside the blocks
are given (random) tensors, so discovery costs one block's memory whatever the depth, reads no weights and leaves
the global random state as it was. Blocks 1.. pass block 0's output on without running.

The spec is data like any other, describing only what was seen: its linear groups, no norm pairs, no residual
structure (``prenorm=False``: the generic per-group recompute path, always correct), not rotatable. GPTQ and RTN
run on it; methods that need norm folding, rotations or feedback refuse it (``ModelSpec.discovered``).
"""

from __future__ import annotations

import copy
import logging
import re

import torch
from torch import nn

from ..errors import FlexQuantError
from .experts import calibration
from .loader import meta_model
from .spec import SPECS, ModelSpec, get_spec, register_discovered

log = logging.getLogger(__name__)

LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")
NORM_NAMES = ("norm", "final_layernorm", "ln_f", "norm_f", "final_layer_norm")
TOKENS = 8  # the discovery input: one window of this many tokens
_warned: dict[str, ModelSpec] = {}


class _Stop(Exception):
    """Raised at the head's input: the discovery forward has seen everything it needs."""


def spec_for(config, trust_remote_code: bool = False) -> ModelSpec:
    """The family's tested spec, or one discovered from a skeleton of the model ``config`` describes (registered,
    so that `get_spec` answers it for the family from now on; a later load of the family discovers again)."""
    if config.model_type in SPECS:
        return get_spec(config.model_type, config)  # (a MoE family expanded to its experts)
    spec = discover_spec(skeleton(config, trust_remote_code))
    register_discovered(spec)
    if _warned.get(spec.family) != spec:
        _warned[spec.family] = spec
        log.warning("model family %s has no tested ModelSpec; discovered %d linears in %d groups per block; only "
                    "gptq/rtn are supported; please report results", spec.family, len(spec.linears),
                    len(spec.linear_groups))
        log.info("discovered linear groups of %s: %s", spec.family, spec.linear_groups)
    return spec


def _unsupported(family: str, why: str) -> FlexQuantError:
    return FlexQuantError(f"model family {family!r} is not supported: it has no tested ModelSpec and {why}; "
                          f"families with one: {', '.join(sorted(SPECS))}")


def skeleton(config, trust_remote_code: bool = False) -> nn.Module:
    """The model ``config`` describes, its parameters on the meta device (its buffers real), with SDPA attention
    (what a discovered family is loaded and its checkpoints are built with)."""
    config = copy.deepcopy(config)
    config.use_cache = False
    try:
        with torch.random.fork_rng(devices=[]):  # (fused 3-D experts: one linear each, discovered like any linear)
            return meta_model(config, dtype=torch.float32, attn_implementation="sdpa",
                              trust_remote_code=trust_remote_code)
    except (ValueError, ImportError) as e:  # no SDPA attention, or not a causal LM transformers knows
        first = str(e).strip().splitlines()[0].split(". ")[0][:200] if str(e).strip() else type(e).__name__
        raise _unsupported(config.model_type, f"transformers cannot build it as a causal LM with SDPA attention "
                                              f"({first})") from e


def module_path(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None) if module is not None else None


def find_layers(model: nn.Module, family: str) -> str:
    """The path of the decoder block list: a usual path, else the ModuleList with the most parameters."""
    lists = {name: m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)}
    path = next((p for p in LAYER_PATHS if p in lists), None)
    if path is None and lists:
        path = max(lists, key=lambda p: sum(t.numel() for t in lists[p].parameters()))
    if path is None:
        raise _unsupported(family, "its decoder blocks could not be found (no nn.ModuleList of blocks under the "
                                   "model)")
    layers, n = lists[path], getattr(model.config, "num_hidden_layers", None)
    if "." not in path or (isinstance(n, int) and len(layers) != n) or len({type(b) for b in layers}) != 1:
        raise _unsupported(family, f"its decoder blocks could not be found ({path} is no list of "
                                   f"{n if isinstance(n, int) else 'alike'} decoder blocks under a base model)")
    return path


def block_linears(model: nn.Module, layers: str, family: str) -> tuple[str, ...]:
    """The ``nn.Linear`` modules of a block (paths within it); every block must hold the same ones."""
    from transformers.pytorch_utils import Conv1D

    blocks = model.get_submodule(layers)
    if any(isinstance(m, Conv1D) for m in blocks.modules()):
        raise _unsupported(family, "its blocks hold transformers Conv1D layers (GPT-2 style), which flexquant does "
                                   "not quantize")
    kinds = [tuple(n for n, m in b.named_modules() if isinstance(m, nn.Linear)) for b in blocks]
    if not kinds[0]:
        raise _unsupported(family, "its decoder blocks hold no nn.Linear layers")
    odd = next((i for i, k in enumerate(kinds) if set(k) != set(kinds[0])), None)
    if odd is not None:
        raise _unsupported(family, f"its blocks are not alike (block {odd} holds other linears than block 0), "
                                   "which a generic ModelSpec cannot describe")
    return kinds[0]


def _materialize(model: nn.Module, layers: str, skip: tuple[str, ...], gen: torch.Generator) -> None:
    """Give random tensors to the meta-device parameters and buffers of block 0 and of the modules outside the
    blocks, except those under ``skip`` (the embedding and the head, which the discovery forward does not run)."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        inside = name.startswith(layers + ".")
        if not t.is_meta or (inside and not name.startswith(f"{layers}.0.")) or \
                any(name.startswith(p + ".") for p in skip):
            continue
        value = (torch.randn(t.shape, generator=gen) * 0.02).to(t.dtype) if t.is_floating_point() else \
            torch.zeros(t.shape, dtype=t.dtype)
        owner_path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_path)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One tensor: the same object, or the same memory seen the same way (a view; both kept alive meanwhile)."""
    return a is b or (not a.is_meta and a.data_ptr() == b.data_ptr() and a.shape == b.shape
                      and a.stride() == b.stride() and a.dtype == b.dtype)


class _Trace:
    """What one discovery forward saw: block 0's linear calls (path, input) in order, the positional arguments
    block 0 was called with, how many blocks ran, the modules finishing after the last block (path, output)
    and the head's input."""

    def __init__(self):
        self.calls: list[tuple[str, torch.Tensor]] = []
        self.block_args = 0
        self.blocks = 0
        self.after: list[tuple[str, object]] = []
        self.done = False
        self.head_input: torch.Tensor | None = None
        self.out0 = None


def _hooks(model: nn.Module, layers: str, head: str, linears: tuple[str, ...], tr: _Trace) -> list:
    blocks = model.get_submodule(layers)
    handles = []

    def on_linear(name):
        def hook(_m, args):
            tr.calls.append((name, args[0]))
        return hook

    for name in linears:
        handles.append(blocks[0].get_submodule(name).register_forward_pre_hook(on_linear(name)))

    def on_block0(_m, args, out):
        tr.block_args, tr.out0 = len(args), out

    def on_block(_m, _args, _out):
        tr.blocks += 1
        tr.done = tr.blocks == len(blocks)

    handles.append(blocks[0].register_forward_hook(on_block0))
    handles += [b.register_forward_hook(on_block) for b in blocks]

    def on_after(name):
        def hook(_m, _args, out):
            if tr.done:
                tr.after.append((name, out))
        return hook

    def on_head(_m, args):
        tr.head_input = args[0]
        raise _Stop

    ancestors = {layers.rsplit(".", k)[0] for k in range(1, layers.count(".") + 1)}
    for name, m in model.named_modules():
        if name and name not in ancestors and name != layers and not name.startswith(layers + ".") and name != head:
            handles.append(m.register_forward_hook(on_after(name)))
    handles.append(model.get_submodule(head).register_forward_pre_hook(on_head))
    return handles


@torch.no_grad()
def trace(model: nn.Module, layers: str, embed: str, head: str, linears: tuple[str, ...]) -> _Trace:
    """One forward of ``model`` on random input embeddings of one window: block 0 runs, the others pass its
    output on, the forward stops at the head's input."""
    blocks = model.get_submodule(layers)
    tr, gen = _Trace(), torch.Generator().manual_seed(0)
    _materialize(model, layers, (embed, head), gen)
    width = model.get_submodule(embed).weight.shape[1]
    x = torch.randn(1, TOKENS, width, generator=gen)
    handles = _hooks(model, layers, head, linears, tr)
    own = [b.__dict__.get("forward") for b in blocks]
    for b in list(blocks)[1:]:
        b.forward = lambda *args, **kwargs: tr.out0
    try:
        model(inputs_embeds=x, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        for b, fwd in list(zip(blocks, own))[1:]:
            del b.forward
            if fwd is not None:
                b.forward = fwd
    return tr


def linear_groups(tr: _Trace, linears: tuple[str, ...], family: str) -> tuple[tuple[str, ...], ...]:
    """Block 0's linears in call order, those reading one tensor in one group (placed where its first runs)."""
    names = [n for n, _ in tr.calls]
    twice = sorted({n for n in names if names.count(n) > 1})
    idle = [n for n in linears if n not in names]
    if twice or idle:
        what = f"{', '.join(twice)} ran more than once" if twice else f"{', '.join(idle[:3])} did not run"
        raise _unsupported(family, f"in one pass through block 0, {what} (a mixture of experts or a conditional "
                                   "branch), which a generic ModelSpec cannot order")
    groups: list[list[str]] = []
    keys: list[torch.Tensor] = []
    for name, x in tr.calls:  # (every expert reads the block's input: each expert is its own group)
        k = next((i for i, y in enumerate(keys) if _same(x, y) and _expert(groups[i][0]) == _expert(name)), None)
        if k is None:
            groups.append([name])
            keys.append(x)
        else:
            groups[k].append(name)
    return tuple(tuple(g) for g in groups)


def _expert(name: str) -> str | None:
    m = re.search(r"\.experts\.(\d+)\.", "." + name)
    return m.group(1) if m else None


def final_norm(model: nn.Module, tr: _Trace, layers: str, family: str) -> str:
    """The module whose output the head reads, run after the last block (by name when the head did not run)."""
    if tr.head_input is None:  # the head's weight used without calling it: the usual names under the base
        base = layers.rsplit(".", 1)[0]
        names = {name for name, _ in model.named_modules()}
        found = next((f"{base}.{n}" for n in NORM_NAMES if f"{base}.{n}" in names), None)
        if found is None:
            raise _unsupported(family, "its final norm could not be found (the head did not run as a module and "
                                       f"{base} has none of {', '.join(NORM_NAMES)})")
        return found
    feeding = [n for n, out in tr.after if isinstance(out, torch.Tensor) and _same(out, tr.head_input)]
    if not feeding:
        raise _unsupported(family, "its final norm could not be found (no module between the last block and the "
                                   "head)")
    norm = feeding[-1]  # the outermost (hooks of an outer module run after those of its children)
    others = [n for n, _ in tr.after if n != norm and not n.startswith(norm + ".")
              and any(True for _ in model.get_submodule(n).parameters(recurse=False))]
    if others or isinstance(model.get_submodule(norm), (nn.Linear, nn.Embedding)):
        raise _unsupported(family, f"between its last block and its head it runs {', '.join([norm] + others)}, "
                                   "where a generic ModelSpec describes one final norm")
    return norm


def discover_spec(model: nn.Module) -> ModelSpec:
    """The ModelSpec of ``model``'s structure (a skeleton or a loaded model; a loaded one is run, not changed)."""
    family = model.config.model_type
    layers = find_layers(model, family)
    embed = module_path(model, model.get_input_embeddings())
    head = module_path(model, model.get_output_embeddings())
    if not embed or not head:
        raise _unsupported(family, "its input embedding or its head (output embeddings) could not be found")
    linears = block_linears(model, layers, family)
    with torch.random.fork_rng(devices=[]), calibration(model, "all"):  # (every expert runs, once)
        try:
            tr = trace(model, layers, embed, head, linears)
        except (RuntimeError, TypeError, ValueError) as e:
            raise _unsupported(family, f"a forward pass through its skeleton failed ({type(e).__name__}: "
                                       f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from e
    n = len(model.get_submodule(layers))
    if tr.blocks != n:
        raise _unsupported(family, f"its base model ran {tr.blocks} of its {n} decoder blocks on a test input")
    if tr.block_args != 1:
        raise _unsupported(family, "its base model passes arguments besides the hidden states to its blocks by "
                                   "position, which the pipeline's capture of block inputs does not record")
    groups = linear_groups(tr, linears, family)
    return ModelSpec(
        family, layers=layers, embed=embed, final_norm=final_norm(model, tr, layers, family), lm_head=head,
        linear_groups=groups, norm_linear_pairs=(), residual_readers=(), residual_writers=(), online_rotations=(),
        prenorm=False, mlp_norm=None, rotatable=False, attn_implementation="sdpa", discovered=True,
    )

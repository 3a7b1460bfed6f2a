"""Activation and K/V-cache fake quantization inside a model's forward pass, with online input transforms.

A quantized weight-activation model carries one `ActQuantRuntime` at ``model.fq_actquant``:
* a `SiteQuantizer` per activation site (the shared input of a linear group: q/k/v, o, gate/up, down):
  the site's online transform x ↦ x·T (the readers' weights hold W·T⁻ᵀ), then symmetric per-token
  quantization of the result with a calibrated clipping ratio. It runs as a forward hook on the norm
  whose output the group reads, or as a forward pre-hook on the group's linear;
* a `KVQuantizer` per attention module: keys (after RoPE) and values quantized per head and token
  (asymmetric), in a transformed space T (key ↦ Q(key·T)·T⁻¹, the q-side T⁻ᵀ folded away).

Its tensors are part of the model's state (so the packed checkpoint stores them) and ``describe()``
records how to rebuild it; `install` / `attach` (re)connect it after loading or packing.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError
from ..transforms.affine import build_transform
from .quantizers import FULL_BITS, fake_quant_asym, fake_quant_sym

RUNTIME_VERSION = 1
ATTRIBUTE = "fq_actquant"


def _check_bits(bits: int, what: str) -> int:
    if not (2 <= int(bits) <= 8 or int(bits) == FULL_BITS):
        raise ValueError(f"{what}={bits} must be 2..8, or {FULL_BITS} for no quantization")
    return int(bits)


def _follow(module: nn.Module, x: torch.Tensor) -> None:
    """Keep a quantizer on the device of the activations it sees: the pipeline onloads one decoder block at
    a time while the runtime (a model-level module) stays where the model was loaded."""
    if module.clip_device != x.device:
        module.to(x.device)


class SiteQuantizer(nn.Module):
    """x ↦ Q_a(x·T): online transform (optional) and symmetric per-token fake quantization."""

    def __init__(self, n: int, bits: int, transform: nn.Module | None = None, clip: float = 1.0):
        super().__init__()
        self.n, self.bits = n, _check_bits(bits, "a_bits")
        self.transform = transform
        self.register_buffer("clip", torch.tensor(float(clip)))

    @property
    def clip_device(self) -> torch.device:
        return self.clip.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _follow(self, x)
        if self.transform is not None:
            x = self.transform(x)
        return fake_quant_sym(x, self.bits, self.clip.to(x.dtype))

    def stored_bits(self) -> int:
        return 32 + (self.transform.stored_bits() if self.transform is not None else 0)

    def describe(self) -> dict:
        return {"n": self.n, "bits": self.bits,
                "transform": None if self.transform is None else self.transform.describe()}


class KVQuantizer(nn.Module):
    """Per-head, per-token asymmetric fake quantization of keys and values in a transformed space."""

    def __init__(self, head_dim: int, k_bits: int, v_bits: int, k_transform: nn.Module | None = None,
                 v_transform: nn.Module | None = None, k_clip: float = 1.0, v_clip: float = 1.0):
        super().__init__()
        self.head_dim = head_dim
        self.k_bits, self.v_bits = _check_bits(k_bits, "k_bits"), _check_bits(v_bits, "v_bits")
        self.k_transform, self.v_transform = k_transform, v_transform
        self.register_buffer("k_clip", torch.tensor(float(k_clip)))
        self.register_buffer("v_clip", torch.tensor(float(v_clip)))

    @property
    def clip_device(self) -> torch.device:
        return self.k_clip.device

    @staticmethod
    def _quant(x, T, bits, clip):
        if bits >= FULL_BITS:
            return x
        y = fake_quant_asym(T(x) if T is not None else x, bits, clip.to(x.dtype))
        return T.unapply(y) if T is not None else y

    def key(self, k: torch.Tensor) -> torch.Tensor:
        _follow(self, k)
        return self._quant(k, self.k_transform, self.k_bits, self.k_clip)

    def value(self, v: torch.Tensor) -> torch.Tensor:
        _follow(self, v)
        return self._quant(v, self.v_transform, self.v_bits, self.v_clip)

    def stored_bits(self) -> int:
        return 64 + sum(t.stored_bits() for t in (self.k_transform, self.v_transform) if t is not None)

    def describe(self) -> dict:
        return {"head_dim": self.head_dim, "k_bits": self.k_bits, "v_bits": self.v_bits,
                "k_transform": None if self.k_transform is None else self.k_transform.describe(),
                "v_transform": None if self.v_transform is None else self.v_transform.describe()}


class ActQuantRuntime(nn.Module):
    """All site and K/V quantizers of a model, with where each one hooks in.

    ``hooks``: site key -> (module path, "output" | "input"); ``attention``: kv key -> attention module path.
    """

    def __init__(self, sites: dict[str, SiteQuantizer], hooks: dict[str, tuple[str, str]],
                 kv: dict[str, KVQuantizer], attention: dict[str, str], settings: dict | None = None):
        super().__init__()
        if set(sites) != set(hooks) or set(kv) != set(attention):
            raise ValueError("every site and K/V quantizer needs a hook location")
        self.sites = nn.ModuleDict(sites)
        self.kv = nn.ModuleDict(kv)
        self.hooks = {k: (str(p), str(w)) for k, (p, w) in hooks.items()}
        self.attention = dict(attention)
        self.settings = dict(settings or {})
        self._handles: list = []
        self._attn_modules: list[nn.Module] = []

    def stored_bits(self) -> int:
        return sum(s.stored_bits() for s in self.sites.values()) + sum(k.stored_bits() for k in self.kv.values())

    def describe(self) -> dict:
        return {
            "version": RUNTIME_VERSION,
            "settings": self.settings,
            "sites": {k: {**s.describe(), "module": self.hooks[k][0], "hook": self.hooks[k][1]}
                      for k, s in self.sites.items()},
            "kv": {k: {**q.describe(), "module": self.attention[k]} for k, q in self.kv.items()},
        }

    @classmethod
    def from_description(cls, desc: dict) -> ActQuantRuntime:
        """A skeleton with the right tensor shapes (the checkpoint's tensors are loaded into it)."""
        if desc.get("version") != RUNTIME_VERSION:
            raise CheckpointError(f"activation-quantization record version {desc.get('version')} is not "
                                  f"supported (this flexquant reads {RUNTIME_VERSION}); re-quantize the model")
        try:
            sites, hooks, kv, attention = {}, {}, {}, {}
            for k, d in desc["sites"].items():
                t = None if d["transform"] is None else build_transform(d["transform"])
                sites[k] = SiteQuantizer(d["n"], d["bits"], t)
                hooks[k] = (d["module"], d["hook"])
            for k, d in desc["kv"].items():
                kt = None if d["k_transform"] is None else build_transform(d["k_transform"])
                vt = None if d["v_transform"] is None else build_transform(d["v_transform"])
                kv[k] = KVQuantizer(d["head_dim"], d["k_bits"], d["v_bits"], kt, vt)
                attention[k] = d["module"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the activation-quantization record is malformed ({e!r}); re-save the model") from e
        return cls(sites, hooks, kv, attention, desc.get("settings"))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self._attn_modules:
            m.__dict__.pop("_fq_kv", None)
        self._attn_modules = []

    def attach(self, model: nn.Module) -> None:
        """(Re)connect every quantizer to the modules currently at its paths in ``model``."""
        self.detach()
        for key, (path, where) in self.hooks.items():
            module, site = model.get_submodule(path), self.sites[key]
            if where == "output":
                self._handles.append(module.register_forward_hook(lambda _m, _a, out, s=site: s(out)))
            elif where == "input":
                self._handles.append(module.register_forward_pre_hook(
                    lambda _m, args, s=site: (s(args[0]),) + tuple(args[1:])))
            else:
                raise CheckpointError(f"site {key}: unknown hook kind {where!r}")
        for key, path in self.attention.items():
            module = model.get_submodule(path)
            module.__dict__["_fq_kv"] = self.kv[key]  # a reference, not a submodule (owned here)
            self._attn_modules.append(module)
        if self.kv:
            from ..models.attention import use_kv_attention

            use_kv_attention(model, True)


def install(model: nn.Module, runtime: ActQuantRuntime) -> ActQuantRuntime:
    """Make ``runtime`` part of ``model`` (its tensors are saved with it) and connect it."""
    remove(model)
    setattr(model, ATTRIBUTE, runtime)
    runtime.attach(model)
    return runtime


def attach(model: nn.Module) -> None:
    """Reconnect the model's runtime, if it has one (after its linears were replaced, e.g. by packing)."""
    runtime = getattr(model, ATTRIBUTE, None)
    if runtime is not None:
        runtime.attach(model)


def remove(model: nn.Module) -> None:
    """Disconnect and drop the model's runtime (plain full-precision activations and SDPA again)."""
    runtime = getattr(model, ATTRIBUTE, None)
    if runtime is None:
        return
    runtime.detach()
    delattr(model, ATTRIBUTE)
    if runtime.kv:
        from ..models.attention import use_kv_attention

        use_kv_attention(model, False)


def stored_bits(model: nn.Module) -> int:
    """Bits of the runtime's stored tensors (transforms and clipping ratios), 0 without one."""
    runtime = getattr(model, ATTRIBUTE, None)
    return 0 if runtime is None else runtime.stored_bits()

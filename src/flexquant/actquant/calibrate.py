"""Calibration of one decoder block's transforms and clipping ratios on its output error (METHODS.md §3).

Each activation site (the shared input of a linear group) has one or more candidate transform types
("none", "rotation", "affine"). On a training copy of the block, every linear of a site computes

    y = Σ_t π_t · Q_a(x·T_t) · Q_w(W·T_t⁻ᵀ)ᵀ + b,      π = softmax(site logits) (one type: π = 1)

and keys/values are replaced by Σ_t π_t · Q_kv(k·S_t)·S_t⁻¹ (S_t: the head-dim transform of the same
type, keys following the q/k/v site and values the o site). Q_a is symmetric per token, Q_kv asymmetric
per head and token, Q_w asymmetric per row and group (the calibration-time stand-in for GPTQ); every
quantizer has a learnable clipping ratio. Affine transforms, clipping ratios and (with several types,
the differentiable search) the logits are trained with Adam on the MSE between the block's output and
the full-precision output. With one type per site this is exactly the computation of the deployed
model (`runtime`), up to the weight quantizer.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models.attention import use_kv_attention
from ..tensorio import move_args
from ..transforms.affine import HadamardRotation, KroneckerAffine, KroneckerRotation
from .quantizers import clip_ratio, fake_quant_asym, fake_quant_sym, fake_quant_weight
from .runtime import KVQuantizer, SiteQuantizer

TYPES = ("none", "rotation", "affine")
ROTATIONS = ("hadamard", "learned")  # the rotation type: fixed randomized Hadamard, or learned orthogonal from it


def make_transform(kind: str, n: int, seed: int, rotation: str = "hadamard") -> nn.Module | None:
    if kind == "none":
        return None
    if kind == "rotation":
        return KroneckerRotation(n, seed) if rotation == "learned" else HadamardRotation(n, seed)
    if kind == "affine":
        return KroneckerAffine(n, seed)
    raise ValueError(f"unknown transform type {kind!r}; known: {', '.join(TYPES)}")


@dataclass(frozen=True)
class Bits:
    w: int
    a: int
    k: int
    v: int
    group_size: int


@dataclass(frozen=True)
class SiteSpec:
    """One activation site of a block: its name, the linears reading it (block-relative), its width."""

    name: str
    linears: tuple[str, ...]
    n: int


@dataclass
class TrainSettings:
    steps: int = 20
    lr: float = 5e-3  # affine transforms
    clip_lr: float = 1e-2  # clipping ratios
    mix_lr: float = 5e-2  # search logits
    clip_init: float = 0.95  # activation / KV clipping ratio at the start
    rotation: str = "hadamard"  # the "rotation" type (ROTATIONS)


@dataclass
class BlockResult:
    """What calibrating one block produced, before it is folded into the model."""

    choice: dict[str, str]  # site -> chosen type
    mix: dict[str, list[float]] = field(default_factory=dict)  # site -> softmax weights (search)
    loss_first: float = 0.0
    loss_last: float = 0.0
    reverted: bool = False  # training raised the loss, so the initial parameters were kept
    seconds: float = 0.0


class _Site(nn.Module):
    """The candidate transforms of one site with their clipping ratios and (search) mixing logits."""

    def __init__(self, spec: SiteSpec, types: tuple[str, ...], a_bits: int, seed: int, clip_init: float,
                 rotation: str = "hadamard"):
        super().__init__()
        self.spec, self.types, self.a_bits = spec, types, a_bits
        self.transforms = nn.ModuleList([make_transform(t, spec.n, seed, rotation) or nn.Identity() for t in types])
        self.act_clip = nn.Parameter(torch.full((len(types),), clip_init))
        self.mix = nn.Parameter(torch.zeros(len(types))) if len(types) > 1 else None
        self._cache: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.mix, 0) if self.mix is not None else self.act_clip.new_ones(1)

    def inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Q_a(x·T_t) for every type (computed once per forward for the linears sharing x)."""
        if self._cache is not None and self._cache[0] is x:
            return self._cache[1]
        clips = clip_ratio(self.act_clip)
        out = [fake_quant_sym(T(x), self.a_bits, clips[t]) for t, T in enumerate(self.transforms)]
        self._cache = (x, out)
        return out

    def fold(self, t: int, W: torch.Tensor) -> torch.Tensor:
        T = self.transforms[t]
        return W if isinstance(T, nn.Identity) else T.fold(W)


class _SiteLinear(nn.Module):
    """A linear of a site on the training copy: the π-mixture of its quantized transformed products."""

    def __init__(self, site: _Site, linear: nn.Linear, bits: Bits):
        super().__init__()
        self.site, self.bits = site, bits
        self.register_buffer("weight", linear.weight.detach().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.w_clip = nn.Parameter(torch.full((len(site.types), linear.out_features), 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pis = self.site.weights()
        y = 0
        for t, xt in enumerate(self.site.inputs(x)):
            Wt = fake_quant_weight(self.site.fold(t, self.weight), self.bits.w, self.bits.group_size,
                                   clip_ratio(self.w_clip[t]))
            y = y + pis[t] * F.linear(xt, Wt)
        return y if self.bias is None else y + self.bias


class _KVTrain(nn.Module):
    """Training-time keys/values: Σ_t π_t Q(k·S_t)·S_t⁻¹ with the q/k/v site's π (keys) and the o site's (values)."""

    def __init__(self, head_dim: int, k_site: _Site, v_site: _Site, bits: Bits, seed: int, clip_init: float,
                 rotation: str = "hadamard"):
        super().__init__()
        self.k_site, self.v_site, self.bits = k_site, v_site, bits
        self.k_transforms = nn.ModuleList([make_transform(t, head_dim, seed + 7, rotation) or nn.Identity()
                                           for t in k_site.types])
        self.v_transforms = nn.ModuleList([make_transform(t, head_dim, seed + 8, rotation) or nn.Identity()
                                           for t in v_site.types])
        self.k_clip = nn.Parameter(torch.full((len(k_site.types),), clip_init))
        self.v_clip = nn.Parameter(torch.full((len(v_site.types),), clip_init))

    @staticmethod
    def _mixed(x, transforms, clips, pis, bits):
        if bits >= 16:
            return x
        out = 0
        for t, T in enumerate(transforms):
            if isinstance(T, nn.Identity):
                y = fake_quant_asym(x, bits, clip_ratio(clips[t]))
            else:
                y = T.unapply(fake_quant_asym(T(x), bits, clip_ratio(clips[t])))
            out = out + pis[t] * y
        return out

    def key(self, k):
        return self._mixed(k, self.k_transforms, self.k_clip, self.k_site.weights(), self.bits.k)

    def value(self, v):
        return self._mixed(v, self.v_transforms, self.v_clip, self.v_site.weights(), self.bits.v)


def _param_groups(sites: list[_Site], linears: list[_SiteLinear], kv: _KVTrain | None, s: TrainSettings):
    transform, clip, mix = [], [], []
    for site in sites:
        transform += [p for T in site.transforms for p in T.parameters() if p.requires_grad]
        clip.append(site.act_clip)
        if site.mix is not None:
            mix.append(site.mix)
    clip += [lin.w_clip for lin in linears]
    if kv is not None:
        transform += [p for T in list(kv.k_transforms) + list(kv.v_transforms) for p in T.parameters()
                      if p.requires_grad]
        clip += [kv.k_clip, kv.v_clip]
    groups = [{"params": transform, "lr": s.lr}, {"params": clip, "lr": s.clip_lr}, {"params": mix, "lr": s.mix_lr}]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def _mean_loss(tb, batches, sites, device) -> float:
    """Mean block-output MSE over all calibration batches (the loss reported before and after training)."""
    total = 0.0
    for h, kw, y in batches:
        out = tb(h.to(device, torch.float32), **move_args(kw, device, torch.float32))
        out = out[0] if isinstance(out, (tuple, list)) else out
        total += float(F.mse_loss(out, y.to(device, torch.float32)))
        for site in sites.values():
            site._cache = None
    return total / len(batches)


def calibrate_block(block: nn.Module, sites: list[SiteSpec], types: dict[str, tuple[str, ...]],
                    attention: str, kv_sites: tuple[str, str], head_dim: int, bits: Bits,
                    inputs, targets: list[torch.Tensor], device, settings: TrainSettings, seed: int):
    """Train a copy of ``block`` with candidate ``types`` per site on MSE(block(inputs), targets).

    ``kv_sites``: the sites whose types the keys and the values follow. Returns (BlockResult, trained
    site modules, trained K/V module) for `finalize_block`.
    """
    t0 = time.perf_counter()
    tb = copy.deepcopy(block).to(device, torch.float32)  # trained in float32 whatever the model's dtype
    for p in tb.parameters():
        p.requires_grad_(False)
    train_sites = {s.name: _Site(s, types[s.name], bits.a, seed + 31 * j, settings.clip_init,
                                 settings.rotation).to(device) for j, s in enumerate(sites)}
    linears = []
    for s in sites:
        for name in s.linears:
            parent, _, child = name.rpartition(".")
            lin = _SiteLinear(train_sites[s.name], tb.get_submodule(name), bits).to(device)
            setattr(tb.get_submodule(parent), child, lin)
            linears.append(lin)
    attn = tb.get_submodule(attention)
    kv = _KVTrain(head_dim, train_sites[kv_sites[0]], train_sites[kv_sites[1]], bits, seed,
                  settings.clip_init, settings.rotation).to(device)
    attn.__dict__["_fq_kv"] = kv
    use_kv_attention(attn, True)  # the copy has its own config object
    groups = _param_groups(list(train_sites.values()), linears, kv, settings)
    opt = torch.optim.Adam(groups) if groups else None
    losses = []
    batches = list(zip(inputs.hidden, inputs.kwargs, targets))
    loss_first = _mean_loss(tb, batches, train_sites, device)
    params = [p for g in groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    updated = False
    with torch.enable_grad():
        for step in range(settings.steps if opt is not None else 0):
            h, kw, y = batches[step % len(batches)]
            out = tb(h.to(device, torch.float32), **move_args(kw, device, torch.float32))
            out = out[0] if isinstance(out, (tuple, list)) else out
            loss = F.mse_loss(out, y.to(device, torch.float32))
            losses.append(float(loss.detach()))
            if not loss.requires_grad:  # nothing here is quantized or learnable (e.g. all 16 bits, no transform)
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            updated = True
            for site in train_sites.values():
                site._cache = None
    for site in train_sites.values():
        site._cache = None
    loss_last = _mean_loss(tb, batches, train_sites, device) if updated else loss_first
    reverted = loss_last > loss_first and not any(site.mix is not None for site in train_sites.values())
    if reverted:  # a few noisy steps made the calibration loss worse: keep the starting point
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        loss_last = loss_first
    res = BlockResult(choice={}, loss_first=loss_first, loss_last=loss_last, reverted=reverted)
    for name, site in train_sites.items():
        w = site.weights().detach()
        res.choice[name] = site.types[int(torch.argmax(w))]
        if site.mix is not None:
            res.mix[name] = [round(float(v), 4) for v in w]
    res.seconds = time.perf_counter() - t0
    return res, train_sites, kv


@torch.no_grad()
def finalize_block(block: nn.Module, sites: list[SiteSpec], train_sites: dict[str, _Site], kv: _KVTrain,
                   kv_sites: tuple[str, str], head_dim: int, bits: Bits):
    """Fold each site's single trained transform into the readers' weights (float64) and return the
    runtime quantizers: ({site name: SiteQuantizer}, KVQuantizer)."""
    out = {}
    for s in sites:
        site = train_sites[s.name]
        if len(site.types) != 1:
            raise ValueError(f"site {s.name} still has {len(site.types)} candidate types; calibrate the chosen one")
        T = site.transforms[0]
        T = None if isinstance(T, nn.Identity) else T.freeze()
        for name in s.linears:
            lin = block.get_submodule(name)
            if T is not None:
                W = lin.weight.data
                lin.weight.data = T.to(W.device).fold(W.double()).to(W.dtype)
        out[s.name] = SiteQuantizer(s.n, bits.a, None if T is None else T.cpu(),
                                    float(clip_ratio(site.act_clip[0])))

    def frozen(T, b):  # a transform of an unquantized cache would only cost time
        return None if isinstance(T, nn.Identity) or b >= 16 else T.cpu().freeze()

    kvq = KVQuantizer(head_dim, bits.k, bits.v, frozen(kv.k_transforms[0], bits.k), frozen(kv.v_transforms[0], bits.v),
                      float(clip_ratio(kv.k_clip[0])), float(clip_ratio(kv.v_clip[0])))
    return out, kvq

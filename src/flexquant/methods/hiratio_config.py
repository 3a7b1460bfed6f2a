"""Options of ``--method hiratio`` (layer-wise high-impact ratios); docs/hiratio.md has the measurements."""

from __future__ import annotations

from dataclasses import dataclass

from ..alloc.qp import QP_BACKENDS
from ..config import MethodConfig, option
from ..errors import FlexQuantError
from ..quant.impact import IMPACTS
from ..quant.result import FP16_BITS

ALLOCATIONS = ("qp", "equal")
CENTERS = ("equal", "zero")
LOSS_MODELS = ("quadratic", "curve")
HI_LEARNERS = ("clip", "round", "gptq")


@dataclass(frozen=True)
class HiRatioConfig(MethodConfig):
    """High-impact ratio options."""

    bpw: float = option(2.5, "honest bits-per-weight budget over all quantized linears, metadata included")
    b_lo: int = option(2, "bits of the low-impact columns (GPTQ)")
    b_hi: int = option(4, "bits of the high-impact columns (2..8), or 16 = fp16 retention (OWQ-style)")
    allocation: str = option("qp", "ratios by the quadratic program, or one equal ratio for every layer",
                             ALLOCATIONS)
    impact: str = option("salience", "column impact: 'salience' Σ_i f_i(w_ij − Q(w_ij))²/[H⁻¹]_jj, or 'obs': "
                                     "the per-weight OBS costs above the layer's 99% quantile", IMPACTS)
    learner: str = option("clip", "quantizer of the high-impact columns: learnable clipping (OmniQuant), "
                                  "sign-gradient rounding (AutoRound) or plain GPTQ", HI_LEARNERS)
    r_max: float = option(0.5, "upper bound of every layer's ratio")
    center: str = option("equal", "loss-model expansion point: the equal allocation (probes at c ± δ) or r = 0 "
                                  "(probes at δ and 2δ)", CENTERS)
    delta: float = option(0.0, "probe step; 0 = the equal ratio at this budget")
    band: int = option(2, "inter-layer terms probed for |l − k| <= band; 0 = every pair")
    trust: float = option(0.5, "QP trust region: each ratio within TRUST × the span its probes covered around "
                               "the centre; 0 = only 0 <= r <= r_max")
    joint_probes: int = option(0, "random joint allocations probed to refit the quadratic model by least "
                                  "squares; 0 = the per-probe finite-difference formulas only")
    loss_model: str = option("quadratic", "QP loss model: quadratic around the centre, or per-layer convex "
                                          "curves over [0, r_max] + pair couplings", LOSS_MODELS)
    curve_points: tuple[float, ...] = option((0.0, 0.06, 0.12, 0.2, 0.4, 0.56, 0.76, 1.0),
                                             "fractions of r_max each layer is probed at for --loss-model curve")
    ratios: tuple[float, ...] = option((), "fixed per-layer ratios instead of the QP (must fit the budget)")
    qp_backend: str = option("auto", "QP solver: OSQP when installed, else scipy", QP_BACKENDS)
    stats_nsamples: int = option(32, "windows of the full-precision statistics pass (Hessians, Fisher)")
    probe_nsamples: int = option(8, "windows the probes measure KL on")
    probe_seqlen: int = option(256, "tokens per probe window")
    learn_nsamples: int = option(8, "windows the learnable quantizer trains on")
    learn_batch: int = option(2, "windows per training step")
    learn_steps: int = option(40, "training steps per block; 0 = no learning")
    learn_lr: float = option(0.0, "learning rate; 0 = 0.05 (Adam, clip) or 1/learn_steps (signed steps, round)")

    def __post_init__(self) -> None:
        def check(ok, msg):
            if not ok:
                raise FlexQuantError(msg)

        check(1.0 < self.bpw <= 16, f"bpw={self.bpw} must be in (1, 16]")
        check(self.b_lo in range(1, 8), f"b_lo={self.b_lo} must be 1..7")
        check(self.b_hi == FP16_BITS or self.b_lo < self.b_hi <= 8,
              f"b_hi={self.b_hi} must be above b_lo={self.b_lo} and at most 8, or 16 (fp16 retention)")
        check(self.center in CENTERS, f"center={self.center!r} must be one of {CENTERS}")
        check(self.allocation in ALLOCATIONS, f"allocation={self.allocation!r} must be one of {ALLOCATIONS}")
        check(self.impact in IMPACTS, f"impact={self.impact!r} must be one of {IMPACTS}")
        check(self.learner in HI_LEARNERS, f"learner={self.learner!r} must be one of {HI_LEARNERS}")
        check(self.qp_backend in QP_BACKENDS, f"qp_backend={self.qp_backend!r} must be one of {QP_BACKENDS}")
        check(0 < self.r_max <= 1, f"r_max={self.r_max} must be in (0, 1]")
        check(0 <= self.delta <= 0.5, f"delta={self.delta} must be in [0, 0.5] (0 = automatic)")
        check(self.band >= 0, f"band={self.band} must be >= 0")
        check(self.joint_probes >= 0, f"joint_probes={self.joint_probes} must be >= 0 (0 = off)")
        check(self.loss_model in LOSS_MODELS, f"loss_model={self.loss_model!r} must be one of {LOSS_MODELS}")
        check(all(0 <= f <= 1 for f in self.curve_points),
              f"curve_points={self.curve_points} must lie in [0, 1]: they are fractions of r_max")
        check(not (self.loss_model == "curve" and self.joint_probes),
              "joint_probes refit the quadratic loss model; use them with loss_model='quadratic'")
        check(self.trust >= 0, f"trust={self.trust} must be >= 0 (0 = no trust region)")
        check(all(0 <= r <= 1 for r in self.ratios), f"ratios={self.ratios} must lie in [0, 1]")
        for k in ("stats_nsamples", "probe_nsamples", "probe_seqlen", "learn_nsamples", "learn_batch"):
            check(getattr(self, k) >= 1, f"{k}={getattr(self, k)} must be >= 1")
        check(self.learn_steps >= 0 and self.learn_lr >= 0, "learn_steps and learn_lr must be >= 0")
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        object.__setattr__(self, "curve_points", tuple(float(f) for f in self.curve_points))

    @property
    def top_bits(self) -> int:
        """The widest quantized (not fp16) group."""
        return self.b_lo if self.b_hi == FP16_BITS else self.b_hi

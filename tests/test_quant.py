import pytest
import torch

from flexquant.config import GPTQConfig, GridConfig
from flexquant.errors import FlexQuantError
from flexquant.quant import FP16_BITS, choose_qparams, gptq_quantize, quantize, rtn_quantize
from flexquant.quant.gptq import hessian_error, inverse_cholesky_upper


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_grid_codes_in_range_and_zero_representable(bits, sym):
    W = torch.randn(10, 64)
    s, z = choose_qparams(W, bits, sym)
    c = quantize(W, s, z, 2**bits - 1)
    assert c.min() >= 0 and c.max() <= 2**bits - 1
    assert torch.equal(z, z.round())  # integer zero point: 0.0 is exactly representable
    assert torch.equal(s, s.half().float())  # scales are fp16-exact


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_signed_symmetric_grid_puts_the_extreme_on_code_zero(bits):
    W = torch.randn(400, 32, generator=torch.Generator().manual_seed(0))
    s, z = choose_qparams(W, bits, sym=True, signed=True)
    c = quantize(W, s, z, 2**bits - 1)
    ext = W.gather(1, W.abs().argmax(1, keepdim=True))
    assert torch.equal(c.gather(1, W.abs().argmax(1, keepdim=True)), torch.zeros_like(ext))  # on code 0
    assert torch.equal(torch.sign(s), -torch.sign(ext)) and torch.equal(s, s.half().float())
    err = {}
    for signed in (False, True):
        s, z = choose_qparams(W, bits, sym=True, signed=signed)
        err[signed] = float(((W - (quantize(W, s, z, 2**bits - 1) - z) * s) ** 2).sum())
    assert err[True] < err[False]  # no step wasted on the side without the extreme
    with pytest.raises(ValueError, match="float16"):
        choose_qparams(W, bits, sym=True, signed=True, scale_base=torch.ones(400, 1))


@pytest.mark.parametrize("signed", [False, True])
def test_lsq_scales_never_worse_than_mse_under_their_weights(signed):
    """clip="lsq" tries every range mse tries plus each one's least-squares scale: never a worse weighted error
    per group, better in sum; and GPTQ with it stays on the grid it stores (codes within range, fp16 scales)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 32, generator=g) ** 3
    w = torch.rand(32, generator=g)

    def err(clip):
        s, z = choose_qparams(W, 4, sym=True, clip=clip, signed=signed, weights=w)
        assert torch.equal(s, s.half().float())
        return (w * (W - (quantize(W, s, z, 15) - z) * s) ** 2).sum(-1)

    mse, lsq = err("mse"), err("lsq")
    assert bool((lsq <= mse * (1 + 1e-6)).all()) and float(lsq.sum()) < float(mse.sum())


def test_mse_clip_never_worse_than_minmax():
    W = torch.randn(50, 64) ** 3
    e = {}
    for clip in ("minmax", "mse"):
        r = rtn_quantize(W, GridConfig(bits=3, group_size=64, clip=clip))
        e[clip] = float(((W - r.dequantize()) ** 2).sum())
    assert e["mse"] < e["minmax"]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn(correlated_layer, bits):
    W, H = correlated_layer
    grid = GridConfig(bits=bits, group_size=64)
    e_rtn = hessian_error(W, rtn_quantize(W, grid).dequantize(), H)
    e_gptq = hessian_error(W, gptq_quantize(W, H, grid).dequantize(), H)
    assert e_gptq < 0.8 * e_rtn


def test_act_order_stores_permutation_and_helps(correlated_layer):
    W, H = correlated_layer
    grid = GridConfig(bits=3, group_size=64)
    with_order = gptq_quantize(W, H, grid, GPTQConfig(act_order=True))
    without = gptq_quantize(W, H, grid, GPTQConfig(act_order=False))
    assert without.perm is None
    assert sorted(with_order.perm.tolist()) == list(range(W.shape[1]))
    # The stored order is descending diag(H): the first column quantized is the most salient one.
    assert int(with_order.perm[0]) == int(torch.argmax(torch.diag(H)))
    assert hessian_error(W, with_order.dequantize(), H) < hessian_error(W, without.dequantize(), H)


def test_group_bit_map_and_kept_columns(correlated_layer):
    W, H = correlated_layer
    grid = GridConfig(bits=2, group_size=64)
    bits = torch.tensor([2, 4, 3, 2], dtype=torch.uint8)
    r = gptq_quantize(W, H, grid, group_bits=bits)
    assert r.group_bits.tolist() == [2, 4, 3, 2]
    kept = torch.arange(10, 74)  # 64 columns kept in fp16, ordered last
    rk = gptq_quantize(W, H, grid, kept=kept)
    assert rk.group_bits.tolist() == [2, 2, 2, FP16_BITS]
    assert set(rk.perm[-64:].tolist()) == set(kept.tolist())
    Wk = rk.dequantize()
    # kept columns absorb the compensation and are stored unquantized (fp16), not on the 2-bit grid
    assert torch.equal(Wk[:, kept], Wk[:, kept].half().float())
    assert Wk[:, kept].unique().numel() > 64 * 4
    plain = gptq_quantize(W, H, grid)
    assert hessian_error(W, Wk, H) < hessian_error(W, plain.dequantize(), H)
    with pytest.raises(FlexQuantError, match="multiple of group_size"):
        gptq_quantize(W, H, grid, kept=torch.arange(10))


def test_dead_columns_are_zeroed(correlated_layer):
    W, H = correlated_layer
    H = H.clone()
    H[5, :] = 0
    H[:, 5] = 0
    r = gptq_quantize(W, H, GridConfig(bits=4, group_size=64))
    assert torch.all(r.dequantize()[:, 5] == 0)


def test_damping_is_retried_upward(caplog):
    n = 32
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    eig = torch.ones(n, dtype=torch.float64)
    eig[0] = -0.03  # indefinite: damping 0.01·mean(diag) is not enough, 0.1 is
    H = (Q * eig) @ Q.T
    U, lam = inverse_cholesky_upper(H.float(), 0.01)
    assert lam == pytest.approx(0.1)
    assert "damping" in caplog.text
    with pytest.raises(FlexQuantError, match="not positive definite"):
        inverse_cholesky_upper(-torch.eye(n), 0.01)


def test_group_size_must_divide():
    W = torch.randn(8, 100)
    with pytest.raises(FlexQuantError, match="does not divide"):
        rtn_quantize(W, GridConfig(bits=4, group_size=64))
    with pytest.raises(FlexQuantError, match="does not divide"):
        gptq_quantize(W, torch.eye(100), GridConfig(bits=4, group_size=64))


@pytest.mark.parametrize("bad", [dict(bits=5), dict(bits=1), dict(group_size=0), dict(group_size=12),
                                 dict(clip="x")])
def test_grid_config_rejects_bad_values(bad):
    with pytest.raises(FlexQuantError):
        GridConfig(**bad)


def test_hessian_accumulator_running_means_and_non_finite_inputs():
    from flexquant.quant.hessian import HessianAccumulator

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 7, 16, generator=g) for _ in range(3)]
    fps = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xs[:2]]  # FP inputs for a prefix only
    acc = HessianAccumulator(16)
    for x, fp in zip(xs, fps + [None]):
        acc.add(x, fp)
    X = torch.cat([x.reshape(-1, 16) for x in xs])
    assert torch.allclose(acc.H, 2 * X.T @ X / X.shape[0], atol=1e-5)
    Xp = torch.cat([x.reshape(-1, 16) for x in xs[:2]])
    dX = torch.cat([(f - x).reshape(-1, 16) for x, f in zip(xs, fps)])
    assert torch.allclose(acc.D, 2 * dX.T @ Xp / Xp.shape[0], atol=1e-5)
    bad = xs[0].clone()
    bad[1, 3, 5] = float("nan")
    with pytest.raises(FlexQuantError, match="overflowed"):
        HessianAccumulator(16).add(bad)


def test_lean_inverse_cholesky_matches_the_separate_steps(monkeypatch):
    from flexquant.quant import gptq
    from flexquant.quant.gptq import _permuted_copy, _widened, inverse_cholesky_upper

    torch.manual_seed(0)
    X = torch.randn(300, 64)
    H = X.T @ X / 300
    H64 = H.double() + 0.01 * float(torch.diag(H.double()).mean()) * torch.eye(64, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H64)), upper=True).float()
    U, lam = inverse_cholesky_upper(H, 0.01)
    assert lam == 0.01 and torch.equal(U, ref)
    own = H.clone()
    U2, _ = inverse_cholesky_upper(own, 0.01, own=True)
    assert U2 is own and torch.equal(U2, ref)
    perm = torch.randperm(64)
    monkeypatch.setattr(gptq, "SLAB_BYTES", 7 * 64 * 4)  # slabs of 7 rows (the last one shorter)
    assert torch.equal(_permuted_copy(H, perm), H[perm][:, perm])
    W = torch.randn(30, 64).half()
    assert torch.equal(_widened(W, perm), W.float()[:, perm])  # 7 float32 rows of 64 at a time
    assert torch.equal(_widened(W, None), W.float())


def test_float32_factorization_in_place_with_a_damped_retry():
    from flexquant.quant.gptq import factor_dtype

    torch.manual_seed(0)
    X = torch.randn(40, 64)
    H = torch.eye(64) + 0.01 * (X.T @ X / 40)
    H[0, 0] = -5e-4  # not positive definite until the damping reaches 1e-3 (three retries)
    calls = []

    def rebuild():
        calls.append(1)
        return H.clone()

    own = H.clone()
    U, lam = inverse_cholesky_upper(own, 1e-6, own=True, dtype=torch.float32, rebuild=rebuild)
    assert lam > 1e-6 and calls and U.dtype == torch.float32 and torch.isfinite(U).all()
    ref, lam64 = inverse_cholesky_upper(H, 1e-6)
    assert lam64 == lam and torch.allclose(U, ref, rtol=1e-3, atol=1e-4)
    assert factor_dtype("auto", 4096) == torch.float64 and factor_dtype("auto", 4097) == torch.float32
    W = torch.randn(16, 64)
    Hp = X.T @ X / 40 + 0.1 * torch.eye(64)
    a = gptq_quantize(W, Hp, GridConfig(bits=4, group_size=32), GPTQConfig(factor_dtype="float32"))
    b = gptq_quantize(W, Hp, GridConfig(bits=4, group_size=32), GPTQConfig(factor_dtype="float64"))
    assert (a.codes == b.codes).float().mean() > 0.98  # the same answer up to float32 rounding


@pytest.mark.parametrize("act_order", [True, False])
def test_parked_hessian_factorization_gives_the_same_result_and_restores_h(monkeypatch, act_order):
    """A large float32 factorization runs in the caller's H (parked on disk meanwhile, read back after): the same
    codes as with a separate copy, H bit-identical afterwards, also through damping retries and kept columns."""
    from flexquant.quant import gptq

    torch.manual_seed(0)
    X = torch.randn(48, 128)
    H = 0.01 * (X.T @ X / 48)
    H[3, 3] = -5e-4  # needs damping retries
    H[:, 7] = H[7, :] = 0  # a dead column
    W = torch.randn(16, 128)
    grid, cfg = GridConfig(bits=3, group_size=32), GPTQConfig(factor_dtype="float32", act_order=act_order)
    kept = torch.tensor([5, 9] + list(range(98, 128)))
    ref = gptq_quantize(W, H, grid, cfg, kept=kept)  # 64 KiB: below PARK_MIN_BYTES, a copy
    H0 = H.clone()
    parked = []
    real = gptq._Parked.__init__

    def spy(self, h):
        parked.append(h.data_ptr() == H.data_ptr())
        real(self, h)

    monkeypatch.setattr(gptq._Parked, "__init__", spy)
    monkeypatch.setattr(gptq, "PARK_MIN_BYTES", 0)
    got = gptq_quantize(W, H, grid, cfg, kept=kept)
    assert parked == [True] and torch.equal(H, H0)
    for field in ("codes", "scales", "zeros", "perm", "fp16_cols"):
        a, b = getattr(ref, field), getattr(got, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert ref.stats == got.stats and ref.stats["damp"] > cfg.damp
    assert gptq._Parked.maybe(H.double(), torch.float64) is None  # float64 factors never use H's buffer


@pytest.mark.parametrize("kw", [dict(clip="mse"), dict(clip="mse", sym=True), dict(clip="lsq", sym=True, signed=True),
                                dict(clip="lsq", sym=True, weights="rows"), dict(clip="mse", scale_base=True)])
def test_the_clip_search_in_pieces_gives_the_whole_search(monkeypatch, kw):
    """choose_qparams searches a large matrix a piece of rows at a time (its temporaries then stay in the cache):
    bit for bit what the whole search gives, strided column slices and per-weight costs included."""
    from flexquant.quant import grid

    torch.manual_seed(0)
    W = torch.randn(300, 7, 64) * 0.02
    kw = dict(kw)
    if kw.get("weights") == "rows":
        kw["weights"] = torch.rand(300, 7, 64)
    if kw.pop("scale_base", False):
        kw["scale_base"] = torch.rand(300, 7, 1) + 0.5
    strided = torch.randn(500, 384)[:, 128:256]
    monkeypatch.setattr(grid, "MSE_CHUNK", 10**12)
    inputs = (W,) if "weights" in kw or "scale_base" in kw else (W, strided)  # (those are W-shaped)
    whole = [grid.choose_qparams(x, 3, **kw) for x in inputs]
    monkeypatch.setattr(grid, "MSE_CHUNK", 1000)
    pieces = [grid.choose_qparams(x, 3, **kw) for x in inputs]
    for (s0, z0), (s1, z1) in zip(whole, pieces):
        assert torch.equal(s0, s1) and torch.equal(z0, z1)


@pytest.mark.parametrize("weighted", [False, True])
def test_squared_error_in_one_buffer_is_quantize_then_dequantize(weighted):
    """The clip search's error, computed in place, is the composition of `quantize` and `dequantize` bit for bit
    (asymmetric and symmetric zeros, clamped codes, per-weight costs)."""
    from flexquant.quant import grid

    torch.manual_seed(0)
    W = torch.randn(50, 6, 32) * 0.02
    W[0, 0, 0] = 0.5  # clamped at the top of the grid
    for bits, sym in ((2, False), (3, True), (4, False)):
        scale, zero = grid.choose_qparams(W * 0.7, bits, sym=sym)  # a range smaller than W's: codes clamp
        weights = torch.rand_like(W) if weighted else None
        d = W - grid.dequantize(grid.quantize(W, scale, zero, 2**bits - 1), scale, zero)
        ref = (d * d if weights is None else weights * d * d).sum(-1, keepdim=True)
        assert torch.equal(grid._sq_error(W, scale, zero, 2**bits - 1, weights), ref)

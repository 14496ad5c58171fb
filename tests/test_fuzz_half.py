"""Differential fuzzing of float16 and bfloat16 max pooling against PyTorch CPU in the same dtype.

The 16-bit max family picks its winners on int16 order keys, on several paths chosen by the
window geometry (joint windows of at most 9 taps, ``reduce_window`` axes, tiling blocks, tap
folds, global windows). Each draw runs one configuration of ``max_pool``, ``adaptive_max_pool``
or ``fractional_max_pool`` (with PyTorch's ``_random_samples``) on input full of the values that
decide ties: NaN of both signs, +-inf, +-0, the largest finite values, the smallest subnormals
(which XLA's CPU code reads as zero in float32) and repeated values.

Compared bit for bit with PyTorch's ``(N, C, *spatial)`` kernels in the same dtype: the values
(with and without indices, and as the primal of a vjp), the indices and the input gradient of a
small-integer cotangent (every sum exact in the dtype). Signed zeros compare equal: a maximum
over mixed -0 and +0 may be +0, as the README states. ``JAXCONV_FUZZ_EXAMPLES`` sets the draws
per op.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fuzz_support import (
    Common,
    DisagreementError,
    from_torch_layout,
    pool_out_size,
    run_fuzz,
    to_torch_layout,
)
from hypothesis import assume
from hypothesis import strategies as st

import jaxconv

torch.set_num_threads(1)

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@st.composite
def halves(draw, dims=(1, 2, 3)):
    return Common(
        n=draw(st.sampled_from(dims)),
        batch=draw(st.sampled_from([(), (2,), (1, 2)])),
        channels=draw(st.integers(1, 3)),
        data_format=draw(st.sampled_from(["channels_last", "channels_first"])),
        dtype=draw(st.sampled_from(["float16", "bfloat16"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def specials(c: Common, spatial) -> np.ndarray:
    """Input in ``c``'s layout, as float32 holding ``c.dtype`` values: a quarter-step grid
    (many ties) with a sixth of the entries replaced by special values."""
    rng = np.random.default_rng(c.seed)
    info = jnp.finfo(c.dtype)
    tiny = float(info.smallest_subnormal)
    picks = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, float(info.max), -float(info.max)]
    picks += [tiny, -tiny, 3 * tiny, -3 * tiny]
    shape = (*spatial, c.channels) if c.data_format == "channels_last" else (c.channels, *spatial)
    x = np.round(rng.standard_normal((*c.batch, *shape)) * 4) / 4
    flat = x.reshape(-1)
    where = rng.random(flat.size) < 1 / 6
    flat[where] = rng.choice(np.array(picks), int(where.sum()))
    return np.asarray(jnp.asarray(x, c.dtype).astype(jnp.float32))


def torch_in(x, c: Common, grad=False):
    t = torch.from_numpy(np.array(to_torch_layout(x, c.n, c.data_format), order="C"))
    return t.to(TORCH_DTYPES[c.dtype]).requires_grad_(grad)


def back(y, c: Common) -> np.ndarray:
    """A PyTorch output or gradient back in jaxconv's layout, as float32 (or int64)."""
    y = y.detach()
    y = y.float() if y.is_floating_point() else y
    return from_torch_layout(y.numpy(), c.batch, c.n, c.data_format)


def equal(name, got, want):
    """Bit-for-bit after widening, except that NaN equals NaN and -0 equals +0."""
    got = np.asarray(got.astype(jnp.float32) if got.dtype != jnp.int32 else got)
    if got.shape != want.shape:
        raise DisagreementError(f"{name}: shape {got.shape} != expected {want.shape}")
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    if not same.all():
        at = tuple(np.argwhere(~same)[0])
        raise DisagreementError(f"{name}: at {at} got {got[at]!r}, expected {want[at]!r}")


def run_both(fn, torch_fn, c: Common, x) -> None:
    """Compare ``fn(x, return_indices)`` (jaxconv) with ``torch_fn`` (values and indices):
    the values without and with indices, and as the primal of either's vjp; the indices; the
    input gradient through either."""

    @jax.jit
    def outputs(x, cot):
        value, index = fn(x, True)
        plain, pull = jax.vjp(lambda v: fn(v, False), x)
        primal, pull_indexed = jax.vjp(lambda v: fn(v, True)[0], x)
        values = {"values": value, "values without indices": fn(x, False)}
        values |= {"vjp primal": plain, "vjp primal with indices": primal}
        grads = {"dx": pull(cot)[0], "dx with indices": pull_indexed(cot)[0]}
        return values, index, grads

    xt = torch_in(x, c, grad=True)
    try:
        yt, it = torch_fn(xt)
    except RuntimeError as err:  # an op PyTorch lacks in this dtype: no oracle
        assume("not implemented" not in str(err))
        raise
    cot = np.random.default_rng(c.seed).integers(-1, 3, yt.shape)
    yt.backward(torch.from_numpy(cot).to(yt.dtype))
    cot = from_torch_layout(cot, c.batch, c.n, c.data_format)
    values, index, grads = outputs(jnp.asarray(x, c.dtype), jnp.asarray(cot, c.dtype))
    for name, got in values.items():
        equal(name, got, back(yt, c))
    equal("indices", index, back(it, c))
    for name, got in grads.items():
        equal(name, got, back(xt.grad, c))


# --- max_pool -----------------------------------------------------------------------------------


@st.composite
def max_cases(draw):
    c = draw(halves())
    top = (5, 5, 4)[c.n - 1]
    kernel = tuple(draw(st.integers(1, top)) for _ in range(c.n))
    stride = tuple(draw(st.integers(1, 3)) if draw(st.booleans()) else k for k in kernel)
    dilation = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(c.n))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    span = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))
    grow = (12, 8, 4)[c.n - 1]
    sizes = tuple(
        max(1, draw(st.integers(s - 2 * p, s + grow))) for s, p in zip(span, padding, strict=True)
    )
    return {
        "c": c,
        "kernel": kernel,
        "stride": stride,
        "dilation": dilation,
        "padding": padding,
        "ceil_mode": draw(st.booleans()),
        "sizes": sizes,
    }


def check_max(case):
    c = case["c"]
    k, s, d, p = case["kernel"], case["stride"], case["dilation"], case["padding"]
    outs = [
        pool_out_size(i, ki, si, pi, pi, di, case["ceil_mode"])
        for i, ki, si, pi, di in zip(case["sizes"], k, s, p, d, strict=True)
    ]
    assume(min(outs) >= 1)
    for i, ki, si, pi, di, o in zip(case["sizes"], k, s, p, d, outs, strict=True):
        # no window of padding only (PyTorch's index then points outside it)
        assume(all(any(0 <= q * si - pi + j * di < i for j in range(ki)) for q in range(o)))

    def fn(x, return_indices):
        return jaxconv.max_pool(
            x, k, s, p, dilation=d, ceil_mode=case["ceil_mode"], return_indices=return_indices,
            data_format=c.data_format,
        )  # fmt: skip

    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[c.n - 1]
    run_both(
        fn,
        lambda xt: pool(xt, k, s, p, d, case["ceil_mode"], return_indices=True),
        c,
        specials(c, case["sizes"]),
    )
    return "agree"


def test_fuzz_half_max_pool():
    run_fuzz("half_max_pool", max_cases(), check_max)


# --- adaptive_max_pool --------------------------------------------------------------------------


@st.composite
def adaptive_cases(draw):
    c = draw(halves())
    grow = (20, 12, 6)[c.n - 1]
    return {
        "c": c,
        "sizes": tuple(draw(st.integers(1, grow)) for _ in range(c.n)),
        "output_size": tuple(draw(st.one_of(st.none(), st.integers(1, 8))) for _ in range(c.n)),
    }


def check_adaptive(case):
    c = case["c"]
    out = tuple(
        i if o is None else o for o, i in zip(case["output_size"], case["sizes"], strict=True)
    )

    def fn(x, return_indices):
        return jaxconv.adaptive_max_pool(
            x, case["output_size"], return_indices=return_indices, data_format=c.data_format
        )

    pool = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[c.n - 1]
    run_both(
        fn,
        lambda xt: pool(xt, out if c.n > 1 else out[0], True),
        c,
        specials(c, case["sizes"]),
    )
    return "agree"


def test_fuzz_half_adaptive_max_pool():
    run_fuzz("half_adaptive_max_pool", adaptive_cases(), check_adaptive)


# --- fractional_max_pool ------------------------------------------------------------------------


@st.composite
def fractional_cases(draw):
    c = draw(halves(dims=(2, 3)))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(c.n))
    # PyTorch's 3-D kernel asks for out + k - 1 < in where 2-D allows equality
    room = 1 if c.n == 2 else 0
    sizes = tuple(draw(st.integers(k + 1 - room, k + (9 if c.n == 2 else 4))) for k in kernel)
    outs = tuple(draw(st.integers(1, i - k + room)) for i, k in zip(sizes, kernel, strict=True))
    return {"c": c, "kernel": kernel, "sizes": sizes, "output_size": outs}


def check_fractional(case):
    c = case["c"]
    rng = np.random.default_rng(c.seed + 2)
    samples = np.asarray(
        jnp.asarray(rng.uniform(size=(*c.batch, c.channels, c.n)), c.dtype).astype(jnp.float32)
    )
    assume(np.all(samples < 1))  # rounding to the dtype may reach 1.0
    order = slice(None, None, -1 if c.n == 2 else 1)  # PyTorch's 2-D samples are (w, h)
    ts = torch.from_numpy(samples.reshape(-1, c.channels, c.n)[..., order].copy())
    ts = ts.to(TORCH_DTYPES[c.dtype])

    def fn(x, return_indices):
        return jaxconv.fractional_max_pool(
            x,
            case["kernel"],
            output_size=case["output_size"],
            samples=jnp.asarray(samples, c.dtype),
            return_indices=return_indices,
            data_format=c.data_format,
        )

    pool = (F.fractional_max_pool2d, F.fractional_max_pool3d)[c.n - 2]
    run_both(
        fn,
        lambda xt: pool(
            xt,
            case["kernel"],
            output_size=case["output_size"],
            return_indices=True,
            _random_samples=ts,
        ),
        c,
        specials(c, case["sizes"]),
    )
    return "agree"


def test_fuzz_half_fractional_max_pool():
    run_fuzz("half_fractional_max_pool", fractional_cases(), check_fractional)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_specials_hold_every_kind_of_value(dtype):
    """The fuzz input holds NaN, both infinities, both zeros, subnormals and ties."""
    c = Common(2, (2,), 3, "channels_last", dtype, 0)
    x = specials(c, (9, 9))
    tiny = float(jnp.finfo(dtype).smallest_subnormal)
    assert np.isnan(x).any() and np.isposinf(x).any() and np.isneginf(x).any()
    assert (np.signbit(x) & (x == 0)).any() and (~np.signbit(x) & (x == 0)).any()
    assert (np.abs(x) == tiny).any()
    assert len(np.unique(x[np.isfinite(x)])) < x[np.isfinite(x)].size // 2


def subnormal_windows(c: Common, spatial) -> np.ndarray:
    """Every entry one of +-0, the smallest subnormals or -1: maxima are subnormal or zero,
    often tied, in every window."""
    tiny = float(jnp.finfo(c.dtype).smallest_subnormal)
    picks = np.array([0.0, -0.0, tiny, -tiny, 2 * tiny, 3 * tiny, -1.0])
    shape = (*spatial, c.channels) if c.data_format == "channels_last" else (c.channels, *spatial)
    x = np.random.default_rng(c.seed).choice(picks, (*c.batch, *shape))
    return np.asarray(jnp.asarray(x, c.dtype).astype(jnp.float32))


def _max_pool(window, stride=None, padding=0):
    def fn(x, return_indices):
        return jaxconv.max_pool(x, window, stride, padding, return_indices=return_indices)

    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(window) - 1]
    return fn, lambda xt: pool(xt, window, stride, padding, return_indices=True)


def _adaptive(out):
    def fn(x, return_indices):
        return jaxconv.adaptive_max_pool(x, out, return_indices=return_indices)

    pool = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[len(out) - 1]
    return fn, lambda xt: pool(xt, out, return_indices=True)


def _fractional(ratio, dtype):
    samples = np.full((2, 3, 2), 0.375, np.float32)  # exact in both dtypes

    def fn(x, return_indices):
        return jaxconv.fractional_max_pool(
            x,
            (2, 2),
            output_ratio=ratio,
            samples=jnp.asarray(samples, dtype),
            return_indices=return_indices,
        )

    def pool(xt):
        ts = torch.from_numpy(samples).to(xt.dtype)
        return F.fractional_max_pool2d(
            xt, (2, 2), output_ratio=(ratio, ratio), return_indices=True, _random_samples=ts
        )

    return fn, pool


PATHS = {  # name: (spatial size, (fn, torch_fn) factory)
    "joint 3x3 s2 p1": ((12, 12), lambda d: _max_pool((3, 3), 2, 1)),
    "reduce_window 5x4 s2 p2": ((12, 12), lambda d: _max_pool((5, 4), 2, 2)),
    "tiling blocks 4x4": ((12, 12), lambda d: _max_pool((4, 4))),
    "disjoint fold 3x3x3": ((6, 6, 6), lambda d: _max_pool((3, 3, 3))),
    "adaptive 12 -> 5": ((12, 12), lambda d: _adaptive((5, 5))),
    "adaptive 12 -> 3": ((12, 12), lambda d: _adaptive((3, 3))),
    "global 12 -> 1": ((12, 12), lambda d: _adaptive((1, 1))),
    "fractional ratio 0.5": ((12, 12), lambda d: _fractional(0.5, d)),
    "fractional ratio 0.7": ((12, 12), lambda d: _fractional(0.7, d)),
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("path", PATHS)
def test_subnormal_and_zero_maxima_on_every_path(path, dtype):
    """Windows whose maximum is a subnormal or a zero, on each path the geometry selects:
    PyTorch's values (also with indices and as the primal of a vjp), indices and gradient.
    bfloat16 subnormals stay subnormal in float32, where XLA's CPU compares read them as zero."""
    spatial, make = PATHS[path]
    c = Common(len(spatial), (2,), 3, "channels_last", dtype, 7)
    fn, torch_fn = make(jnp.dtype(dtype))
    run_both(fn, torch_fn, c, subnormal_windows(c, spatial))


def _graham():
    def fn(x, return_indices):
        return jaxconv.fractional_max_pool_graham(
            x, output_ratio=(0.7, 0.7), key=jax.random.key(0), return_indices=return_indices
        )

    return fn


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("return_indices", [False, True])
@pytest.mark.parametrize("path", [*PATHS, "graham"])
def test_second_derivatives_on_every_path(path, return_indices, dtype):
    """The 16-bit keys carry no derivative, so each path's rule differentiates its primal
    again: the Hessian-vector product of ``sum(y**2)`` is float32's on the same values."""
    spatial = (12, 12) if path == "graham" else PATHS[path][0]
    fn = _graham() if path == "graham" else PATHS[path][1](jnp.dtype(dtype))[0]
    shape = (2, *spatial, 3)  # the batch and channels of the fractional samples
    x = np.random.default_rng(5).permutation(int(np.prod(shape))).reshape(shape) / 8.0

    def loss(v):
        y = fn(v, return_indices)
        y = y[0] if return_indices else y
        return jnp.sum(y.astype(jnp.float32) ** 2)

    def hvp(v):
        return jax.jvp(jax.grad(loss), (v,), (jnp.ones_like(v),))[1]

    got = jax.jit(hvp)(jnp.asarray(x, dtype))
    want = jax.jit(hvp)(jnp.asarray(x, dtype).astype(jnp.float32))
    assert np.any(np.asarray(want) != 0)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want))

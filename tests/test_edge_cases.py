"""Numerical edge cases: zero and constant windows, inf and NaN, magnitudes, dtypes, large p.

PyTorch CPU is the oracle where it computes the same thing (NaN/inf propagation, tie rules);
elsewhere the expected value follows from the definition (the max of equal values, the norm of a
constant window) and is computed in float64. Every op runs under ``jax.jit``.
"""

import functools
import math
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxconv

HALF_DTYPES = [jnp.float16, jnp.bfloat16]


def op(name):
    fn = getattr(jaxconv, name, None)
    if fn is None:
        pytest.skip(f"jaxconv.{name} is not available")
    return fn


# Every op as ``f(x)`` on a 2-D channels_last x (*batch, H, W, C); values only.
def _samples(x):
    return jnp.full((*x.shape[:-3], x.shape[-1], 2), 0.37, x.dtype)


OPS = {
    "max_pool": lambda x: op("max_pool")(x, (2, 2), 1, 1, ceil_mode=True),
    "avg_pool": lambda x: op("avg_pool")(x, (3, 3), 2, 1, ceil_mode=True),
    "avg_pool_tiled": lambda x: op("avg_pool")(x, (2, 3)),
    "avg_pool_axes": lambda x: op("avg_pool")(x, (5, 6), 1, (1, 2)),  # > 27 taps, one axis a time
    "lp_pool2": lambda x: op("lp_pool")(x, 2.0, (2, 2), 1, 1),
    "lp_pool3.5": lambda x: op("lp_pool")(x, 3.5, (2, 2), 2),
    "lp_pool_inf": lambda x: op("lp_pool")(x, math.inf, (2, 2), 2),
    "avg_pool_global": lambda x: op("avg_pool")(x, x.shape[-3:-1]),
    "adaptive_avg_pool": lambda x: op("adaptive_avg_pool")(x, (3, 2)),
    "adaptive_avg_pool_global": lambda x: op("adaptive_avg_pool")(x, (1, 1)),
    "adaptive_max_pool": lambda x: op("adaptive_max_pool")(x, (3, 2)),
    "fractional_max_pool": lambda x: op("fractional_max_pool")(
        x, (2, 2), output_size=(3, 3), samples=_samples(x)
    ),
    "conv": lambda x: op("conv")(x, jnp.ones((2, 2, x.shape[-1], 2), x.dtype), padding=1),
    "conv_transpose": lambda x: op("conv_transpose")(
        x, jnp.ones((2, 2, 2, x.shape[-1]), x.dtype), stride=2
    ),
}
# Ops whose value on a constant window equals the constant.
CONSTANT_PRESERVING = ["max_pool", "adaptive_avg_pool", "adaptive_max_pool", "fractional_max_pool"]


def jit_value_and_grad(f, x):
    """``f(x)`` and the gradient of ``sum(f(x) * cot)`` from one jitted call (cot fixed)."""

    def loss(x):
        y = f(x)
        cot = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y.astype(jnp.float32) * cot)

    return jax.jit(lambda x: (f(x), jax.grad(loss)(x)))(x)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def nhwc(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


@pytest.mark.parametrize("name", list(OPS))
def test_all_zero_input_gives_zeros_and_finite_gradients(name):
    x = jnp.zeros((2, 5, 6, 3), jnp.float32)
    y, g = jit_value_and_grad(OPS[name], x)
    np.testing.assert_array_equal(np.asarray(y), 0.0)
    assert np.isfinite(np.asarray(g)).all(), f"{name}: non-finite gradient at zero input"


@pytest.mark.parametrize("name", list(OPS))
def test_empty_batch_and_channels(name):
    """A batch (or, pooling, channel) axis of size 0 gives an empty output of the right shape
    and an empty gradient, as PyTorch does."""
    full = jax.eval_shape(OPS[name], jnp.zeros((2, 5, 6, 3))).shape
    axes = [0] if name.startswith("conv") else [0, 3]
    for axis in axes:
        shape = [2, 5, 6, 3]
        shape[axis] = 0
        y, g = jit_value_and_grad(OPS[name], jnp.zeros(shape))
        assert y.shape == (*full[:axis], 0, *full[axis + 1 :])
        assert g.shape == tuple(shape)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, 7.5, math.inf])
def test_lp_zero_windows_have_zero_gradient(p):
    """Zero windows (partially zero input) give 0 and a zero gradient, never NaN (also d/dp)."""
    x = jnp.zeros((1, 4, 4, 1), jnp.float32).at[0, 0, 0, 0].set(2.0)
    f = op("lp_pool")
    y, g = jit_value_and_grad(lambda x: f(x, p, (2, 2)), x)
    expected = np.zeros((1, 2, 2, 1), np.float32)
    expected[0, 0, 0, 0] = 2.0
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-6)
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g)[0, 2:, :, 0], 0.0)
    if not math.isinf(p):
        dp = jax.jit(jax.grad(lambda p: f(x, p, (2, 2)).sum()))(jnp.float32(p))
        assert np.isfinite(float(dp))


@pytest.mark.parametrize("name", CONSTANT_PRESERVING)
@pytest.mark.parametrize("value", [-3.25, 0.0, 7.0])
def test_constant_input_is_preserved(name, value):
    x = jnp.full((2, 5, 6, 3), value, jnp.float32)
    y, g = jit_value_and_grad(OPS[name], x)
    np.testing.assert_array_equal(np.asarray(y), value)
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("name", [*OPS, "max_pool_2x2", "adaptive_max_pool_tiled"])
def test_results_are_never_weak_typed(name):
    """A weak-typed input (a broadcast Python scalar) gives a result of its dtype that
    promotes as that dtype, eagerly and under jit alike: every op, every path."""
    extra = {
        "max_pool_2x2": lambda x: op("max_pool")(x, (2, 2)),
        "adaptive_max_pool_tiled": lambda x: op("adaptive_max_pool")(x, (2, 2)),
    }
    f = extra.get(name) or OPS[name]
    with jax.numpy_dtype_promotion("standard"):
        x = jnp.broadcast_to(jnp.asarray(0.5), (1, 4, 4, 2))
        assert x.weak_type
        for y in (f(x), jax.jit(f)(x)):
            assert not y.weak_type and y.dtype == x.dtype


def test_lp_of_constant_window_is_scaled_constant():
    x = jnp.full((1, 4, 4, 2), -1.5, jnp.float32)
    for p in (1.0, 2.0, 3.0, 5.5):
        y = jax.jit(lambda x, p=p: op("lp_pool")(x, p, (2, 2)))(x)
        np.testing.assert_allclose(np.asarray(y), 1.5 * 4 ** (1 / p), rtol=1e-6)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_max_pool_ties_pick_the_first_maximum_like_pytorch(dims):
    """All-equal windows and ties with padding: indices and gradient as PyTorch."""
    rng = np.random.default_rng(dims)
    shape = (2, 3) + (5,) * dims
    x = rng.integers(0, 2, size=shape).astype(np.float32)  # many ties
    window, pool = (3,) * dims, (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
    f = op("max_pool")
    fn = jax.jit(
        lambda x: f(
            x, window, 2, 1, ceil_mode=True, return_indices=True, data_format="channels_first"
        )
    )
    y, idx = fn(jnp.asarray(x))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt, it = pool(xt, window, 2, 1, 1, True, return_indices=True)
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy())
    np.testing.assert_array_equal(np.asarray(idx), it.numpy())
    cot = np.cos(np.arange(yt.numel())).reshape(yt.shape).astype(np.float32)
    yt.backward(torch.from_numpy(cot))
    g = jax.jit(jax.grad(lambda x: jnp.sum(fn(x)[0] * cot)))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), xt.grad.numpy(), rtol=1e-6)


SPECIALS = [np.nan, np.inf, -np.inf]


def _special_input(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    flat = x.reshape(-1)
    pos = rng.choice(flat.size, 30, replace=False)
    flat[pos] = rng.choice(SPECIALS, 30)
    x[0, 0, :3, :3] = -np.inf  # an all -inf window
    return x


@pytest.mark.parametrize("seed", [0, 1])
def test_max_pool_nan_and_inf_like_pytorch(seed):
    x = _special_input(seed)
    f = op("max_pool")
    y, idx = jax.jit(
        lambda x: f(x, (3, 3), 2, 1, return_indices=True, data_format="channels_first")
    )(jnp.asarray(x))
    yt, it = F.max_pool2d(torch.from_numpy(x), 3, 2, 1, return_indices=True)
    np.testing.assert_array_equal(np.asarray(y), yt.numpy())  # NaN == NaN here
    np.testing.assert_array_equal(np.asarray(idx), it.numpy())


@pytest.mark.parametrize(
    ("shape", "window", "stride", "padding", "ceil_mode"),
    [
        ((2, 3, 9), (3,), 2, 1, True),
        ((2, 3, 6, 7), (3, 3), 2, 1, False),
        ((2, 3, 6, 7), (2, 2), 1, 1, True),
        ((2, 3, 5, 6, 5), (2, 2, 2), 2, 1, True),
    ],
)
@pytest.mark.parametrize("values", ["ties", "specials"])
def test_max_pool_gradient_goes_where_pytorch_sends_it(
    shape, window, stride, padding, ceil_mode, values
):
    """The gradient without indices (one flat winner per window) on tie-heavy input and on NaN,
    inf and all -inf windows beside padding, as PyTorch's."""
    rng = np.random.default_rng(len(shape))
    if values == "ties":
        x = rng.integers(0, 2, size=shape).astype(np.float32)
    else:
        x = rng.standard_normal(shape).astype(np.float32)
        flat = x.reshape(-1)
        pos = rng.choice(flat.size, flat.size // 4, replace=False)
        flat[pos] = rng.choice(SPECIALS, pos.size)
        x[(0, 0, *[slice(0, 2)] * len(window))] = -np.inf
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(window) - 1]
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = pool(xt, window, stride, padding, 1, ceil_mode)
    cot = np.cos(np.arange(yt.numel())).reshape(yt.shape).astype(np.float32)
    yt.backward(torch.from_numpy(cot))
    f = op("max_pool")

    def pool_and_grad(x):
        y, vjp = jax.vjp(
            lambda x: f(
                x, window, stride, padding, ceil_mode=ceil_mode, data_format="channels_first"
            ),
            x,
        )
        return y, vjp(jnp.asarray(cot))[0]

    y, g = jax.jit(pool_and_grad)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy())
    np.testing.assert_allclose(np.asarray(g), xt.grad.numpy(), rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_max_nan_and_inf_like_pytorch(seed):
    x = _special_input(seed)
    f = op("adaptive_max_pool")
    y, idx = jax.jit(lambda x: f(x, (4, 3), return_indices=True, data_format="channels_first"))(
        jnp.asarray(x)
    )
    yt, it = F.adaptive_max_pool2d(torch.from_numpy(x), (4, 3), return_indices=True)
    np.testing.assert_array_equal(np.asarray(y), yt.numpy())
    np.testing.assert_array_equal(np.asarray(idx), it.numpy())


@pytest.mark.parametrize(
    ("which", "shape", "size"),
    [
        ("adaptive_max_pool", (2, 3, 16, 12), (4, 3)),
        ("max_pool", (2, 3, 16, 12), (4, 4)),
        ("adaptive_max_pool", (2, 3, 128, 70), (2, 1)),  # 64 and 70 taps: int16 tap ranks
        ("adaptive_max_pool", (2, 3, 16, 12), (1, 1)),  # one window of 192 taps
    ],
)
def test_tiling_max_nan_and_inf_gradient_like_pytorch(which, shape, size):
    """Windows that tile the input with 4 or more taps per axis (their winners come from
    reductions): NaN, inf and all -inf windows give PyTorch's values and gradient."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    pos = rng.choice(flat.size, 60, replace=False)
    flat[pos] = rng.choice(SPECIALS, 60)
    x[0, 0, :4, :4] = -np.inf
    x[1, 2, 4:8, :4] = np.where(np.arange(16).reshape(4, 4) % 5 == 0, np.nan, 1.0)
    if shape[2] >= 80:  # an all -inf window and NaN among ties on the long axes
        x[1, 1, 64:, :] = -np.inf
        x[0, 1, 64:80, 50:] = np.where(np.arange(16 * 20).reshape(16, 20) % 7 == 3, np.nan, 2.0)
    xt = torch.from_numpy(x).requires_grad_(True)
    if which == "adaptive_max_pool":
        yt = F.adaptive_max_pool2d(xt, size)
        fn = functools.partial(op(which), output_size=size, data_format="channels_first")
    else:
        yt = F.max_pool2d(xt, size, size)
        fn = functools.partial(op(which), window=size, stride=size, data_format="channels_first")
    cot = np.cos(np.arange(yt.numel())).reshape(yt.shape).astype(np.float32)
    yt.backward(torch.from_numpy(cot))
    y, vjp = jax.vjp(fn, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy())
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(cot))[0]), xt.grad.numpy(), rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_avg_nan_and_inf_like_pytorch(seed):
    x = _special_input(seed)
    y = jax.jit(lambda x: op("avg_pool")(x, (3, 3), 2, 1, data_format="channels_first"))(
        jnp.asarray(x)
    )
    yt = F.avg_pool2d(torch.from_numpy(x), 3, 2, 1)
    np.testing.assert_allclose(np.asarray(y), yt.numpy(), rtol=1e-5, atol=1e-6)
    ya = jax.jit(lambda x: op("adaptive_avg_pool")(x, (4, 3), data_format="channels_first"))(
        jnp.asarray(x)
    )
    np.testing.assert_allclose(
        np.asarray(ya), F.adaptive_avg_pool2d(torch.from_numpy(x), (4, 3)).numpy(), rtol=1e-5
    )


def test_lp_nan_and_inf():
    """NaN propagates; an inf in a window gives inf (the norm is infinite); elsewhere finite."""
    x = np.ones((1, 4, 4, 1), np.float32)
    x[0, 0, 0, 0], x[0, 3, 3, 0] = np.nan, -np.inf  # windows (0, 0) and (1, 1)
    for p in (1.0, 2.0, 3.5, 64.0, math.inf, jnp.float32(2.5)):
        y = np.asarray(jax.jit(lambda x, p=p: op("lp_pool")(x, p, (2, 2)))(jnp.asarray(x)))
        assert np.isnan(y[0, 0, 0, 0]) and y[0, 1, 1, 0] == np.inf, (p, y)
        np.testing.assert_allclose(y[0, [0, 1], [1, 0], 0], 4 ** (1 / float(p)), rtol=1e-6)


# --- magnitudes ---------------------------------------------------------------------------------

MAGNITUDES = [
    (jnp.float32, 1e38),
    (jnp.float32, 1e-30),
    (jnp.float16, 6e4),
    (jnp.float16, 1e-4),
    (jnp.bfloat16, 1e38),
]


@pytest.mark.parametrize(("dtype", "scale"), MAGNITUDES)
@pytest.mark.parametrize(
    "name",
    [
        "max_pool",
        "avg_pool",
        "avg_pool_tiled",
        "avg_pool_axes",
        "avg_pool_global",
        "adaptive_avg_pool",
        "adaptive_avg_pool_global",
        "adaptive_max_pool",
    ],
)
def test_extreme_magnitudes_stay_finite(name, dtype, scale):
    """Averages and maxima of representable values are representable: no overflow inside."""
    rng = np.random.default_rng(0)
    x64 = scale * rng.uniform(0.5, 1.0, (2, 5, 6, 3))
    y = jax.jit(OPS[name])(jnp.asarray(x64, dtype))
    want = jax.jit(OPS[name])(jnp.asarray(x64))  # float64
    chex.assert_trees_all_equal_dtypes(y, jnp.zeros((), dtype))
    assert np.isfinite(np.asarray(y, np.float64)).all(), f"{name} overflows at {scale} in {dtype}"
    rtol = {jnp.float32: 1e-6, jnp.float16: 2e-3, jnp.bfloat16: 1e-2}[dtype]
    np.testing.assert_allclose(np.asarray(y, np.float64), np.asarray(want), rtol=rtol)


@pytest.mark.parametrize(("dtype", "scale"), [*MAGNITUDES, (jnp.float16, 1e4)])
@pytest.mark.parametrize("p", [2.0, 16.0, math.inf])
def test_lp_extreme_magnitudes(dtype, scale, p):
    """Scaled by the window max: no overflow or underflow of |x|^p, in every dtype."""
    rng = np.random.default_rng(1)
    x64 = scale * rng.uniform(0.5, 1.0, (1, 4, 4, 2)) / 4  # the norm stays representable
    y, g = jit_value_and_grad(lambda x: op("lp_pool")(x, p, (2, 2)), jnp.asarray(x64, dtype))
    want = np.asarray(jax.jit(lambda x: op("lp_pool")(x, p, (2, 2)))(jnp.asarray(x64)))
    assert y.dtype == dtype
    assert np.isfinite(np.asarray(y, np.float64)).all()
    rtol = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1e-2}[dtype]
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=rtol)
    assert np.isfinite(np.asarray(g, np.float64)).all()


@pytest.mark.parametrize(("dtype", "tiny"), [(jnp.float32, 1e-45), (jnp.float64, 5e-324)])
def test_subnormal_inputs_give_finite_results(dtype, tiny):
    """Subnormal inputs: finite, non-negative results no larger than exact (XLA's CPU backend
    flushes subnormals to zero in any computation, so 0 is allowed), finite gradients."""
    x = jnp.full((1, 4, 4, 2), tiny, dtype)
    for name in ("max_pool", "avg_pool", "lp_pool2", "lp_pool_inf", "adaptive_avg_pool"):
        y, g = jit_value_and_grad(OPS[name], x)
        y = np.asarray(y, np.float64)
        assert np.isfinite(y).all() and (y >= 0).all(), name
        assert (y <= 2 * tiny * 4).all(), name
        assert np.isfinite(np.asarray(g, np.float64)).all(), name


# --- dtypes -------------------------------------------------------------------------------------


_FLOAT32 = {}


def _float32_result(name, x):
    """The float32 value and gradient of an op on the float32 copy of the half input (cached)."""
    key = (name, np.asarray(x).tobytes())
    if key not in _FLOAT32:
        _FLOAT32[key] = jit_value_and_grad(OPS[name], x)
    return _FLOAT32[key]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", list(OPS))
def test_half_dtypes_match_float32(name, dtype):
    """float16/bfloat16 in, the same dtype out, close to the float32 result; gradients too."""
    rng = np.random.default_rng(2)
    x32 = jnp.asarray(rng.standard_normal((2, 5, 6, 3)), jnp.float32)
    x = x32.astype(dtype)
    y, g = jit_value_and_grad(OPS[name], x)
    y32, g32 = _float32_result(name, x.astype(jnp.float32))
    assert y.dtype == dtype and g.dtype == dtype
    tol = {jnp.float16: 5e-3, jnp.bfloat16: 3e-2}[dtype]
    scale = float(jnp.max(jnp.abs(y32)))
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=tol, atol=tol * scale)
    gscale = float(jnp.max(jnp.abs(g32)))
    np.testing.assert_allclose(np.asarray(g, np.float32), g32, rtol=tol, atol=2 * tol * gscale)


@pytest.mark.parametrize("name", list(OPS))
def test_float64_in_float64_out(name):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 6, 3)))
    y, g = jit_value_and_grad(OPS[name], x)
    assert y.dtype == jnp.float64 and g.dtype == jnp.float64
    assert np.isfinite(np.asarray(g)).all()


def test_max_unpool_half_dtypes_and_indices_dtypes():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 6, 6, 3)), jnp.float32)
    values, idx = jax.jit(lambda x: op("max_pool")(x, (2, 2), return_indices=True))(x)
    ref = jax.jit(lambda v, i: op("max_unpool")(v, i, (2, 2)))(values, idx)
    for dtype in HALF_DTYPES:
        for idt in (jnp.int32, jnp.int64):
            out = jax.jit(lambda v, i: op("max_unpool")(v, i, (2, 2)))(
                values.astype(dtype), idx.astype(idt)
            )
            assert out.dtype == dtype
            np.testing.assert_array_equal(np.asarray(out, np.float32), ref.astype(dtype))


# --- large p ------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [64.0, 1000.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_lp_large_p_tends_to_max_abs(p, dtype):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 3)) * 100, dtype)
    y, g = jit_value_and_grad(lambda x: op("lp_pool")(x, p, (3, 3)), x)
    y = np.asarray(y, np.float64)
    m = np.asarray(jax.jit(lambda x: op("lp_pool")(x, math.inf, (3, 3)))(x), np.float64)
    assert np.isfinite(y).all()
    # max|x| <= ||x||_p <= 9^(1/p) max|x|
    slack = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1e-2}[dtype]
    assert (y >= m * (1 - slack)).all() and (y <= m * 9 ** (1 / p) * (1 + slack)).all()
    assert np.isfinite(np.asarray(g, np.float64)).all()
    gp = jax.jit(jax.grad(lambda p: op("lp_pool")(x.astype(jnp.float32), p, (3, 3)).sum()))(
        jnp.float32(p)
    )
    assert np.isfinite(float(gp))


def test_lp_p1_is_window_size_times_avg_on_nonnegative_input():
    """The seed's identity: p = 1 on x >= 0 is |S| * avg_pool."""
    x = jnp.abs(jnp.asarray(np.random.default_rng(6).standard_normal((2, 6, 6, 3))))
    lp = jax.jit(lambda x: op("lp_pool")(x, 1.0, (2, 3)))(x)
    avg = jax.jit(lambda x: op("avg_pool")(x, (2, 3)))(x)
    np.testing.assert_allclose(np.asarray(lp), 6 * np.asarray(avg), rtol=1e-12)


# --- crashes ------------------------------------------------------------------------------------

CRASH_REPRO = """
import jax, jax.numpy as jnp, numpy as np, torch, jaxconv
jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
y, w = rng.standard_normal((5, 2, 1)), rng.standard_normal((2, 3, 2, 1))
f = lambda y, w: jaxconv.conv_transpose(y, w, stride=2, padding=1)
out = jax.jit(f)(jnp.asarray(y), jnp.asarray(w))
gy, gw = jax.jit(jax.grad(lambda y, w: (f(y, w) ** 2).sum(), argnums=(0, 1)))(y, w)
ty = torch.tensor(y.transpose(2, 0, 1)[None], requires_grad=True)
tw = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)
tout = torch.nn.functional.conv_transpose2d(ty, tw, stride=2, padding=1)
(tout ** 2).sum().backward()
np.testing.assert_allclose(np.asarray(out).transpose(2, 0, 1), tout[0].detach().numpy(), rtol=1e-10)
np.testing.assert_allclose(np.asarray(gy), ty.grad[0].numpy().transpose(1, 2, 0), rtol=1e-10)
np.testing.assert_allclose(np.asarray(gw), tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-10)
# The gradient of a strided conv whose output is shorter than the kernel is the same XLA pattern.
x = rng.standard_normal((1, 8, 3, 2))
g = lambda x, w: jaxconv.conv(x, w, stride=2, padding=1)
gx, gw = jax.jit(jax.grad(lambda x, w: (g(x, w) ** 2).sum(), argnums=(0, 1)))(x, w)
tx = torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), requires_grad=True)
tw = torch.tensor(np.ascontiguousarray(w.transpose(3, 2, 0, 1)), requires_grad=True)
(torch.nn.functional.conv2d(tx, tw, stride=2, padding=1) ** 2).sum().backward()
np.testing.assert_allclose(np.asarray(gx), tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-10)
np.testing.assert_allclose(np.asarray(gw), tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-10)
"""


def test_short_axes_do_not_crash_the_compiler():
    """An input axis shorter than the kernel aborts XLA's CPU compiler unless padded; run in a
    subprocess so that a crash fails this test instead of killing the test session."""
    result = subprocess.run(
        [sys.executable, "-c", CRASH_REPRO], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


GROUP_WINDOW_REPRO = """
import jax, jax.numpy as jnp, numpy as np, torch, jaxconv
jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
x, w = rng.standard_normal((2, 6, 4, 2)), rng.standard_normal((3, 2, 2, 1))
g = lambda x, w: jaxconv.conv(x, w, stride=(1, 2), padding=(0, 1), dilation=(2, 1))
gx, gw = jax.jit(jax.grad(lambda x, w: (g(x, w) ** 2).sum(), argnums=(0, 1)))(x, w)
hx = jax.jit(jax.hessian(lambda x: (g(x, w) ** 2).sum()))(x)
tx = torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), requires_grad=True)
tw = torch.tensor(np.ascontiguousarray(w.transpose(3, 2, 0, 1)), requires_grad=True)
t = torch.nn.functional.conv2d(tx, tw, stride=(1, 2), padding=(0, 1), dilation=(2, 1))
(t ** 2).sum().backward()
np.testing.assert_allclose(np.asarray(gx), tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-10)
np.testing.assert_allclose(np.asarray(gw), tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-10)
assert np.isfinite(np.asarray(hx)).all()
# conv_transpose with the same pattern: kernel 2, stride 2, padding 1 on axis 1.
y = rng.standard_normal((2, 2, 5, 1))
f = lambda y, w: jaxconv.conv_transpose(y, w, stride=(1, 2), padding=(0, 1), dilation=(2, 1))
gy, gw = jax.jit(jax.grad(lambda y, w: (f(y, w) ** 2).sum(), argnums=(0, 1)))(y, w)
ty = torch.tensor(np.ascontiguousarray(y.transpose(0, 3, 1, 2)), requires_grad=True)
tw = torch.tensor(np.ascontiguousarray(w.transpose(3, 2, 0, 1)), requires_grad=True)
t = torch.nn.functional.conv_transpose2d(ty, tw, stride=(1, 2), padding=(0, 1), dilation=(2, 1))
(t ** 2).sum().backward()
np.testing.assert_allclose(np.asarray(gy), ty.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-10)
np.testing.assert_allclose(np.asarray(gw), tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-10)
"""


def test_short_unstrided_axis_beside_a_strided_one_does_not_crash_the_compiler():
    result = subprocess.run(
        [sys.executable, "-c", GROUP_WINDOW_REPRO], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


WEIGHT_TANGENT_REPRO = """
import jax, jax.numpy as jnp, numpy as np, torch, jaxconv
jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
cases = [  # (y channels_last, w (*k, out, in)) and keywords: an axis with stride 1, dilation 2
    ((2, 5, 1), (4, 3, 1, 1), dict(padding=(1, 0), dilation=(2, 1))),  # and 2 outputs
    ((2, 5, 1), (3, 2, 2, 1), dict(stride=(1, 2), padding=(1, 2), output_padding=(0, 1),
                                   dilation=(2, 3))),
]
for y_shape, w_shape, kw in cases:
    y, w, tw = (rng.standard_normal(s) for s in (y_shape, w_shape, w_shape))
    f = lambda w: jaxconv.conv_transpose(jnp.asarray(y), w, **kw)
    _, tangent = jax.jvp(f, (jnp.asarray(w),), (jnp.asarray(tw),))
    hvp = jax.grad(lambda w: (jax.grad(lambda w: (f(w) ** 2).sum())(w) ** 2).sum())(w)
    ty = torch.tensor(y.transpose(2, 0, 1)[None])
    tws = [torch.tensor(np.ascontiguousarray(a.transpose(3, 2, 0, 1)), requires_grad=True)
           for a in (w, tw)]
    tf = lambda w: torch.nn.functional.conv_transpose2d(ty, w, **kw)
    _, t_tangent = torch.autograd.functional.jvp(tf, tws[0], tws[1])
    g = torch.autograd.grad((tf(tws[0]) ** 2).sum(), tws[0], create_graph=True)[0]
    (t_hvp,) = torch.autograd.grad((g ** 2).sum(), tws[0])
    np.testing.assert_allclose(np.asarray(tangent), t_tangent[0].numpy().transpose(1, 2, 0),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(hvp), t_hvp.numpy().transpose(2, 3, 1, 0), rtol=1e-10)
"""


def test_weight_tangent_of_a_short_dilated_axis_does_not_crash_the_compiler():
    """conv_transpose's forward-mode weight derivative, and its gradient of a gradient, on an
    axis with stride 1, dilation 2 and 2 convolution outputs, against PyTorch."""
    result = subprocess.run(
        [sys.executable, "-c", WEIGHT_TANGENT_REPRO], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def _half_specials(shape, dtype, seed):
    """Random values in ``dtype`` with NaN of both signs, +-inf, +-0, the largest finite values,
    ties and the smallest subnormals."""
    rng = np.random.default_rng(seed)
    big, tiny = float(jnp.finfo(dtype).max), float(jnp.finfo(dtype).smallest_subnormal)
    specials = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, big, -big, 1, 1]
    specials = np.array([*specials, tiny, -tiny])
    x = rng.standard_normal(shape)
    flat = x.reshape(-1)
    pos = rng.choice(flat.size, flat.size // 6, replace=False)
    flat[pos] = rng.choice(specials, pos.size)
    x[(0, 0, *[slice(0, 2)] * (len(shape) - 2))] = -np.inf
    return np.array(jnp.asarray(x, dtype).astype(jnp.float32))


@pytest.mark.parametrize(
    ("shape", "name", "args", "kwargs"),
    [
        ((2, 3, 9, 11), "max_pool2d", ((3, 3), 2, 1), {}),
        ((2, 3, 9, 11), "max_pool2d", ((5, 4), 2, 2), {"ceil_mode": True}),
        ((2, 3, 12, 8), "max_pool2d", ((4, 4),), {}),
        ((2, 3, 5, 6, 5), "max_pool3d", ((2, 2, 2), 2, 1), {"ceil_mode": True}),
        ((2, 3, 17), "max_pool1d", ((3,), 1, 1), {}),
        ((2, 3, 9, 11), "adaptive_max_pool2d", ((4, 3),), {}),
        ((2, 3, 16, 16), "adaptive_max_pool2d", ((2, 4),), {}),
        ((2, 3, 7, 7), "adaptive_max_pool2d", ((1, 1),), {}),
    ],
)
@pytest.mark.parametrize(
    ("dtype", "tdtype"), [(jnp.float16, torch.float16), (jnp.bfloat16, torch.bfloat16)]
)
def test_half_max_values_like_pytorch(shape, name, args, kwargs, dtype, tdtype):
    """16-bit max on NaN of either sign, +-inf, +-0, the largest finite values, subnormals,
    ties and all -inf windows: PyTorch's values in the same dtype (signed zeros compare equal),
    with and without a derivative, and its gradient (small integer cotangents, so every sum is
    exact in the dtype). The int16 order keys get subnormal winners right, which float32
    compares on CPU read as zero."""
    f = op("adaptive_max_pool" if name.startswith("adaptive") else "max_pool")

    def pool(v):
        return f(v, *args, **kwargs, data_format="channels_first")

    seed = len(shape) + len(args)
    x = _half_specials(shape, dtype, seed)
    want = getattr(F, name)(torch.from_numpy(x).to(tdtype), *args, **kwargs)
    y = jax.jit(pool)(jnp.asarray(x, dtype))
    chex.assert_type(y, dtype)
    np.testing.assert_array_equal(np.asarray(y, np.float32), want.float().numpy())

    x = _half_specials(shape, dtype, seed + 1)
    xt = torch.from_numpy(x).to(tdtype).requires_grad_(True)
    yt = getattr(F, name)(xt, *args, **kwargs)
    cot = np.random.default_rng(0).integers(-3, 4, yt.shape).astype(np.float32)
    yt.backward(torch.from_numpy(cot).to(tdtype))

    def pool_and_grad(v):
        y, vjp = jax.vjp(pool, v)
        return y, vjp(jnp.asarray(cot, dtype))[0]

    y, g = jax.jit(pool_and_grad)(jnp.asarray(x, dtype))
    chex.assert_type([y, g], dtype)
    np.testing.assert_array_equal(np.asarray(y, np.float32), yt.detach().float().numpy())
    np.testing.assert_array_equal(np.asarray(g, np.float32), xt.grad.float().numpy())


@pytest.mark.parametrize(
    ("shape", "name", "args", "kwargs"),
    [
        ((2, 3, 9, 11), "max_pool2d", ((5, 4), 2, 2), {"ceil_mode": True}),
        ((2, 3, 12, 8), "max_pool2d", ((4, 4),), {}),
        ((2, 3, 5, 6, 7), "max_pool3d", ((3, 2, 3), 2, 1), {}),
        ((2, 3, 50, 50), "adaptive_max_pool2d", ((7, 7),), {}),
    ],
)
@pytest.mark.parametrize(
    ("dtype", "tdtype"), [(jnp.float16, torch.float16), (jnp.bfloat16, torch.bfloat16)]
)
def test_half_max_indices_like_pytorch(shape, name, args, kwargs, dtype, tdtype):
    """16-bit values and indices of windows beyond the joint path (their winners compare int16
    order keys) on NaN of either sign, +-inf, +-0, ties and subnormals: PyTorch's, and so is
    the gradient through the values."""
    f = op("adaptive_max_pool" if name.startswith("adaptive") else "max_pool")

    def pool(v):
        return f(v, *args, **kwargs, return_indices=True, data_format="channels_first")

    x = _half_specials(shape, dtype, len(shape) + len(args))
    want, want_index = getattr(F, name)(
        torch.from_numpy(x).to(tdtype), *args, **kwargs, return_indices=True
    )
    y, index = jax.jit(pool)(jnp.asarray(x, dtype))
    chex.assert_type([y, index], [dtype, jnp.int32])
    np.testing.assert_array_equal(np.asarray(y, np.float32), want.float().numpy())
    np.testing.assert_array_equal(np.asarray(index), want_index.numpy())

    x = _half_specials(shape, dtype, len(shape))
    xt = torch.from_numpy(x).to(tdtype).requires_grad_(True)
    yt, _ = getattr(F, name)(xt, *args, **kwargs, return_indices=True)
    cot = np.random.default_rng(1).integers(-3, 4, yt.shape).astype(np.float32)
    yt.backward(torch.from_numpy(cot).to(tdtype))
    g = jax.jit(jax.grad(lambda v: jnp.sum(pool(v)[0].astype(jnp.float32) * cot)))(
        jnp.asarray(x, dtype)
    )
    np.testing.assert_array_equal(np.asarray(g, np.float32), xt.grad.float().numpy())


@pytest.mark.parametrize(
    ("shape", "name", "args", "kwargs"),
    [
        ((2, 3, 9, 11), "max_pool2d", ((3, 3), 2, 1), {}),
        ((2, 3, 10, 12), "max_pool2d", ((2, 2), 2), {}),
        ((2, 3, 5, 6, 5), "max_pool3d", ((2, 2, 2), 2, 1), {"ceil_mode": True}),
        ((2, 3, 9, 11), "max_pool2d", ((5, 4), 2, 2), {"ceil_mode": True}),
        ((2, 3, 17), "max_pool1d", ((3,), 1, 1), {}),
    ],
)
@pytest.mark.parametrize(
    ("dtype", "tdtype"), [(jnp.float16, torch.float16), (jnp.bfloat16, torch.bfloat16)]
)
def test_half_max_subnormal_winners_like_pytorch(shape, name, args, kwargs, dtype, tdtype):
    """Windows of at most 9 taps and ``reduce_window`` axes compare int16 order keys for the
    indices and for the gradient too, so subnormal winners are PyTorch's there (float32
    compares on CPU read subnormals as zero)."""
    f = op("max_pool")

    def pool(v):
        return f(v, *args, **kwargs, return_indices=True, data_format="channels_first")

    x = _half_specials(shape, dtype, len(shape) + len(args) + 7)
    xt = torch.from_numpy(x).to(tdtype).requires_grad_(True)
    yt, it = getattr(F, name)(xt, *args, **kwargs, return_indices=True)
    cot = np.random.default_rng(2).integers(-3, 4, yt.shape).astype(np.float32)
    yt.backward(torch.from_numpy(cot).to(tdtype))
    y, index = jax.jit(pool)(jnp.asarray(x, dtype))
    g = jax.jit(jax.grad(lambda v: jnp.sum(pool(v)[0].astype(jnp.float32) * cot)))(
        jnp.asarray(x, dtype)
    )
    np.testing.assert_array_equal(np.asarray(y, np.float32), yt.detach().float().numpy())
    np.testing.assert_array_equal(np.asarray(index), it.numpy())
    np.testing.assert_array_equal(np.asarray(g, np.float32), xt.grad.float().numpy())


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("return_indices", [False, True])
def test_half_max_gradient_sums_overlaps_once(dtype, return_indices):
    """Where windows overlap, an input's cotangents from several windows are summed in float32
    and rounded once: the float32 gradient of the same values, rounded to the dtype."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.permutation(2 * 21 * 23 * 3).reshape(2, 21, 23, 3) / 64, dtype)
    cot = jnp.asarray(rng.standard_normal((2, 10, 11, 3)), dtype)

    def loss(v):
        y = op("max_pool")(v, (5, 4), 2, 1, return_indices=return_indices)
        y = y[0] if return_indices else y
        return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32))

    g = jax.jit(jax.grad(loss))(x)
    g32 = jax.jit(jax.grad(loss))(x.astype(jnp.float32))
    np.testing.assert_array_equal(
        np.asarray(g, np.float32), np.asarray(g32.astype(dtype), np.float32)
    )


@pytest.mark.parametrize(
    ("dtype", "tdtype"), [(jnp.float16, torch.float16), (jnp.bfloat16, torch.bfloat16)]
)
@pytest.mark.parametrize(
    ("window", "stride", "padding"),
    [((3, 3), 1, 0), ((3, 3), 2, 1), ((2, 2), 2, 0), ((5, 4), 2, 2), ((4, 5), 1, 0)],
)
def test_half_max_signed_zero_ties_like_pytorch(window, stride, padding, dtype, tdtype):
    """-0 and +0 tie, so the first zero wins and takes the gradient, as in PyTorch."""
    rng = np.random.default_rng(3)
    x = rng.choice(np.array([0.0, -0.0, -1.0], np.float32), size=(2, 3, 9, 8))
    xt = torch.from_numpy(x).to(tdtype).requires_grad_(True)
    yt = F.max_pool2d(xt, window, stride, padding)
    cot = rng.integers(1, 4, yt.shape).astype(np.float32)
    yt.backward(torch.from_numpy(cot).to(tdtype))
    pool = functools.partial(
        op("max_pool"), window=window, stride=stride, padding=padding, data_format="channels_first"
    )
    g = jax.jit(jax.grad(lambda v: jnp.sum(pool(v) * jnp.asarray(cot, dtype))))(
        jnp.asarray(x, dtype)
    )
    np.testing.assert_array_equal(np.asarray(g, np.float32), xt.grad.float().numpy())


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize(
    ("window", "stride", "padding"), [((3, 3), 2, 1), ((2, 2), 2, 0), ((5, 4), 2, 2)]
)
def test_half_max_forward_mode_and_hessian_match_float32(window, stride, padding, dtype):
    """The 16-bit rule keeps forward mode and second derivatives: jvp and the Hessian of
    ``sum(y**2)`` equal float32's on tie-free input."""
    x = jnp.asarray(np.random.default_rng(4).permutation(42).reshape(1, 6, 7, 1) / 8.0, dtype)
    pool = functools.partial(op("max_pool"), window=window, stride=stride, padding=padding)

    def loss(v):
        return jnp.sum(pool(v).astype(jnp.float32) ** 2)

    tangent = jnp.asarray(np.arange(42).reshape(x.shape) % 5, dtype)
    _, t = jax.jvp(pool, (x,), (tangent,))
    _, t32 = jax.jvp(pool, (x.astype(jnp.float32),), (tangent.astype(jnp.float32),))
    np.testing.assert_array_equal(np.asarray(t, np.float32), t32)
    h = jax.jit(jax.hessian(loss))(x)
    np.testing.assert_array_equal(
        np.asarray(h, np.float32), jax.hessian(loss)(x.astype(jnp.float32))
    )


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_max_padding_only_window_is_minus_inf(dtype):
    """A window that reads padding only (length 1, k=2, dilation 2, padding 1) is -inf, as in
    float32, not the NaN below every int16 order key."""
    x = jnp.full((1, 1, 1), 2.0, dtype)
    y = jax.jit(lambda v: op("max_pool")(v, (2,), 1, 1, dilation=2))(x)
    chex.assert_type(y, dtype)
    np.testing.assert_array_equal(np.asarray(y, np.float32).reshape(-1), [-np.inf])


SIGNED_ZERO_POOLS = {
    "max 2x2": (lambda v, **k: op("max_pool")(v, (2, 2), 2, **k), lambda t: F.max_pool2d(t, 2)),
    "max 3x3 s2 p1": (
        lambda v, **k: op("max_pool")(v, (3, 3), 2, 1, **k),
        lambda t: F.max_pool2d(t, 3, 2, 1),
    ),
    "max 5x5 s2 p2": (
        lambda v, **k: op("max_pool")(v, (5, 5), 2, 2, **k),
        lambda t: F.max_pool2d(t, 5, 2, 2),
    ),
    "max 7x7 s7": (lambda v, **k: op("max_pool")(v, (7, 7), 7, **k), lambda t: F.max_pool2d(t, 7)),
    "adaptive 14->5": (
        lambda v, **k: op("adaptive_max_pool")(v, (5, 5), **k),
        lambda t: F.adaptive_max_pool2d(t, (5, 5)),
    ),
    "adaptive 14->1": (
        lambda v, **k: op("adaptive_max_pool")(v, (1, 1), **k),
        lambda t: F.adaptive_max_pool2d(t, (1, 1)),
    ),
}


@pytest.mark.parametrize("name", list(SIGNED_ZERO_POOLS))
@pytest.mark.parametrize(
    ("dtype", "tdtype"),
    [(jnp.float32, torch.float32), (jnp.float16, torch.float16), (jnp.bfloat16, torch.bfloat16)],
)
def test_max_of_negative_zero_is_negative_zero(name, dtype, tdtype):
    """A window whose maximum is -0 (no +0 in it) gives -0, as PyTorch, with or without
    indices and as the primal of a vjp (16-bit order keys once mapped -0 to +0)."""
    pool, reference = SIGNED_ZERO_POOLS[name]
    rng = np.random.default_rng(5)
    values = np.array([-0.0, -1.0, -2.0, -np.inf], np.float32)
    x = rng.choice(values, size=(2, 3, 14, 14), p=[0.03, 0.47, 0.4, 0.1])
    expected = reference(torch.from_numpy(x).to(tdtype)).float().numpy()
    assert (expected == 0).any()
    want = np.signbit(expected)
    v = jnp.asarray(x, dtype)
    outs = {
        "alone": pool(v, data_format="channels_first"),
        "indices": pool(v, data_format="channels_first", return_indices=True)[0],
        "vjp": jax.vjp(lambda u: pool(u, data_format="channels_first"), v)[0],
    }
    for how, y in outs.items():
        np.testing.assert_array_equal(np.signbit(np.asarray(y, np.float32)), want, err_msg=how)


def test_means_of_opposite_overflowing_sums_are_rescued():
    """Partial sums overflowing to +inf and -inf give NaN: rescued where the mean is finite."""
    big = float(jnp.finfo(jnp.float32).max)
    x = jnp.asarray([big] * 18 + [-big] * 18, jnp.float32).reshape(1, 36, 1)
    np.testing.assert_array_equal(jaxconv.adaptive_avg_pool(x, (1,)), [[[0.0]]])
    np.testing.assert_array_equal(jaxconv.avg_pool(x, (36,)), [[[0.0]]])
    x = x.at[0, 0, 0].set(jnp.nan)
    assert np.isnan(jaxconv.adaptive_avg_pool(x, (1,))[0, 0, 0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_fractional_starts_stay_inside_long_axes(dtype):
    """PyTorch's start formula in 16 bits passes the last start on long axes (PyTorch fails an
    assertion there): the starts are clipped, so indices stay inside and gradients all land."""
    size = 200 if dtype == jnp.bfloat16 else 4100
    out = size - 1 if dtype == jnp.bfloat16 else size // 2
    x = jnp.ones((1, size, 64), dtype)

    def pool(x):
        return jaxconv.fractional_max_pool(
            x, (1,), output_size=out, key=jax.random.key(0), return_indices=True
        )

    _, indices = jax.jit(pool)(x)
    assert int(indices.min()) >= 0 and int(indices.max()) <= size - 1
    grad = jax.grad(lambda x: jnp.sum(pool(x)[0].astype(jnp.float32)))(x)
    assert float(jnp.sum(grad.astype(jnp.float32))) == out * 64

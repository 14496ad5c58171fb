"""Numerical edge cases: zero, empty and constant input, weak types, magnitudes, dtypes, large p.

The expected value follows from the definition (the max of equal values, the norm of a constant
window) and is computed in float64, or is the float32 result for 16-bit input. Every op runs under
``jax.jit``.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from edge_support import HALF_DTYPES, op

import jaxconv


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

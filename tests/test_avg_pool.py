"""avg_pool against PyTorch's avg_pool{1,2,3}d and a numpy reference written from the definition."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.test_util import check_grads

import jaxconv

TORCH_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
SEED_C = np.array([[109, 92, 72], [108, 85, 74], [110, 74, 79]], np.float64)


def to_layout(x_cf: np.ndarray, data_format: str) -> np.ndarray:
    """An (N, C, *spatial) array in ``data_format``."""
    return x_cf if data_format == "channels_first" else np.moveaxis(x_cf, 1, -1)


def from_layout(y: np.ndarray, data_format: str) -> np.ndarray:
    return y if data_format == "channels_first" else np.moveaxis(y, -1, 1)


def out_size(i, k, s, pad, ceil_mode):
    """PyTorch's pooling output size (Pool.h) with padding ``(lo, hi)``."""
    lo, hi = pad
    out = (i + lo + hi - k + (s - 1 if ceil_mode else 0)) // s + 1
    return out - 1 if ceil_mode and (out - 1) * s >= i + lo else out


def reference_avg(x_cf, window, stride, pads, ceil_mode, count_include_pad, divisor_override):
    """Average pooling of an (N, C, *spatial) array, straight from the definition."""
    sizes = x_cf.shape[2:]
    outs = [
        out_size(i, k, s, p, ceil_mode)
        for i, k, s, p in zip(sizes, window, stride, pads, strict=True)
    ]
    y = np.zeros(x_cf.shape[:2] + tuple(outs))
    for o in itertools.product(*(range(n) for n in outs)):
        ranges, div = [], 1
        for oi, i, k, s, (lo, hi) in zip(o, sizes, window, stride, pads, strict=True):
            start = oi * s - lo
            pos = [q for q in range(start, start + k) if 0 <= q < i]
            ranges.append(pos)
            low, high = (-lo, i + hi) if count_include_pad else (0, i)
            div *= min(start + k, high) - max(start, low)
        block = x_cf[(slice(None), slice(None), *np.ix_(*ranges))]
        total = block.reshape((*block.shape[:2], -1)).sum(-1)
        y[(slice(None), slice(None), *o)] = total / (divisor_override or div)
    return y


# (n, window, stride, padding, ceil_mode, count_include_pad, divisor_override, data_format):
# a sample of the grid that covers every feature on every dimensionality.
TORCH_CASES = [
    (1, (3,), None, 0, False, True, None, "channels_last"),
    (1, (4,), (2,), 2, True, False, None, "channels_first"),
    (1, (3,), (1,), 1, False, False, None, "channels_last"),
    (1, (5,), (3,), 2, True, True, None, "channels_last"),
    (2, (2, 2), None, 0, False, True, None, "channels_last"),
    (2, (3, 3), (1, 1), 1, False, True, None, "channels_last"),
    (2, (3, 3), (2, 2), 1, True, False, None, "channels_first"),
    (2, (3, 2), (2, 1), (1, 0), True, True, None, "channels_last"),
    (2, (3, 3), (2, 2), 1, False, True, 5, "channels_first"),
    (2, (4, 3), (3, 2), (2, 1), True, False, 7, "channels_last"),
    (2, (1, 1), (2, 2), 0, True, True, None, "channels_first"),
    (2, (4, 3), None, 0, False, True, None, "channels_first"),  # tiling, a remainder cropped
    (2, (9, 8), None, 0, False, False, None, "channels_last"),  # global: one window
    (3, (2, 3, 5), None, 0, True, True, 4, "channels_last"),  # tiling with divisor_override
    (2, (6, 5), (2, 3), 2, True, False, None, "channels_last"),  # > BOX_LIMIT: axis by axis
    (2, (6, 5), (2, 3), (3, 1), True, True, 7, "channels_first"),
    (3, (4, 4, 2), (1, 2, 1), (2, 1, 1), False, False, None, "channels_last"),
    (3, (2, 2, 2), None, 0, False, True, None, "channels_last"),
    (3, (3, 3, 3), (2, 2, 2), 1, True, False, None, "channels_first"),
    (3, (3, 2, 3), (1, 2, 2), (1, 1, 0), True, True, 3, "channels_last"),
    (3, (2, 3, 2), (2, 1, 3), (1, 0, 1), False, False, None, "channels_last"),
]
SPATIAL = {1: (11,), 2: (9, 8), 3: (7, 6, 5)}


def _jax_avg(window, stride, padding, ceil_mode, cip, div, data_format):
    def f(x):
        return jaxconv.avg_pool(
            x,
            window,
            stride,
            padding,
            ceil_mode=ceil_mode,
            count_include_pad=cip,
            divisor_override=div,
            data_format=data_format,
        )

    return f


@pytest.mark.parametrize("case", TORCH_CASES, ids=str)
def test_matches_torch_forward_and_input_gradient(case):
    n, window, stride, padding, ceil_mode, cip, div, data_format = case
    rng = np.random.default_rng(n)
    x_cf = rng.standard_normal((2, 3, *SPATIAL[n])).astype(np.float32)
    xt = torch.tensor(x_cf, requires_grad=True)
    kwargs = {"ceil_mode": ceil_mode, "count_include_pad": cip}
    if div is not None:
        kwargs["divisor_override"] = div
    yt = TORCH_AVG[n](xt, window, stride or window, padding, **kwargs)
    g_cf = rng.standard_normal(yt.shape).astype(np.float32)
    yt.backward(torch.tensor(g_cf))

    f = _jax_avg(window, stride, padding, ceil_mode, cip, div, data_format)
    y, vjp = jax.vjp(jax.jit(f), jnp.asarray(to_layout(x_cf, data_format)))
    (dx,) = vjp(jnp.asarray(to_layout(g_cf, data_format)))
    chex.assert_shape(y, to_layout(np.zeros(yt.shape), data_format).shape)
    chex.assert_type([y, dx], jnp.float32)
    np.testing.assert_allclose(from_layout(np.asarray(y), data_format), yt.detach(), atol=1e-5)
    np.testing.assert_allclose(from_layout(np.asarray(dx), data_format), xt.grad, atol=1e-5)


@pytest.mark.parametrize(
    ("window", "stride", "padding", "ceil_mode", "cip", "div"),
    [
        ((3, 3), (2, 2), ((1, 0), (0, 1)), False, True, None),
        ((3, 3), (2, 2), ((1, 0), (0, 1)), True, False, None),
        ((4, 2), (3, 1), ((0, 2), (1, 0)), True, True, None),
        ((3, 3), (2, 2), "SAME", False, True, None),
        ((3, 3), (2, 2), "SAME", False, False, None),
        ((4, 3), (1, 2), "SAME", True, True, 4),
        ((2, 2), None, "VALID", True, True, None),
    ],
)
def test_asymmetric_and_same_padding_match_the_definition(
    window, stride, padding, ceil_mode, cip, div
):
    x_cf = np.random.default_rng(0).standard_normal((2, 3, 9, 8))
    f = jax.jit(_jax_avg(window, stride, padding, ceil_mode, cip, div, "channels_first"))
    y = np.asarray(f(jnp.asarray(x_cf)))
    strides = stride or window
    pads = jaxconv._src.arithmetic.resolve_padding(
        "test", padding, 2, kernel=window, stride=strides, dilation=(1, 1), in_sizes=(9, 8)
    )
    expected = reference_avg(x_cf, window, strides, pads, ceil_mode, cip, div)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("shape", "window", "stride", "padding", "ceil_mode", "cip"),
    [
        ((1, 7, 2), (3,), (2,), 1, True, False),
        ((2, 6, 5, 2), (3, 2), (2, 1), 1, False, True),
        ((1, 4, 4, 3, 1), (2, 2, 3), (2, 1, 2), (1, 0, 1), True, False),
    ],
)
def test_check_grads_forward_and_reverse_order_2(shape, window, stride, padding, ceil_mode, cip):
    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape))

    def f(x):
        return jaxconv.avg_pool(
            x, window, stride, padding, ceil_mode=ceil_mode, count_include_pad=cip
        )

    check_grads(jax.jit(f), (x,), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_forward_mode_tangent_is_the_average_of_the_tangent(dtype):
    """The op is linear: its jvp's tangent is the op applied to the tangent (same dtype, same
    rounding), also under vmap, and ``jax.hessian`` of a loss through it is reverse over
    reverse."""
    rng = np.random.default_rng(2)
    x, t = (jnp.asarray(rng.standard_normal((3, 7, 6, 4)), dtype) for _ in range(2))

    def f(x):
        return jaxconv.avg_pool(x, (3, 2), (2, 1), 1, ceil_mode=True, count_include_pad=False)

    y, jt = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, t)
    assert jt.dtype == dtype
    np.testing.assert_array_equal(np.asarray(jt, np.float64), np.asarray(f(t), np.float64))
    np.testing.assert_array_equal(np.asarray(y, np.float64), np.asarray(f(x), np.float64))
    _, jt_v = jax.vmap(lambda x, t: jax.jvp(f, (x,), (t,)))(x[:, None], t[:, None])
    np.testing.assert_array_equal(np.asarray(jt_v[:, 0], np.float64), np.asarray(jt, np.float64))
    x64 = x.astype(jnp.float64)[:1, :5, :4, :1]

    def loss(x):
        return jnp.sum(jnp.sin(f(x)))

    n = x64.size
    hess = jax.jit(jax.hessian(loss))(x64).reshape(n, n)
    np.testing.assert_allclose(hess, jax.jacrev(jax.jacrev(loss))(x64).reshape(n, n), atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(("window", "stride"), [((1,), 2), ((3,), 4), ((3, 3), (3, 4))], ids=str)
def test_gradient_keeps_the_dtype_where_the_stride_skips_inputs(window, stride, dtype):
    """Inputs no window reads (stride > window) get a zero gradient in ``x``'s dtype, under
    jit too (float16 gave float32 eagerly and failed to lower under jit)."""
    shape = (2, 9, 3) if len(window) == 1 else (2, 9, 10, 3)
    x = jnp.asarray(np.random.default_rng(3).standard_normal(shape), dtype)

    def loss(v):
        return jnp.sum(jaxconv.avg_pool(v, window, stride).astype(jnp.float32) ** 2)

    grads = [jax.grad(loss)(x), jax.jit(jax.grad(loss))(x)]
    wide = jax.grad(loss)(x.astype(jnp.float32))
    for g in grads:
        chex.assert_type(g, dtype)
        np.testing.assert_allclose(np.asarray(g, np.float32), wide, rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(np.asarray(grads[0] == 0), np.asarray(wide == 0))


def test_weak_typed_input_gives_the_same_dtype_with_and_without_jit():
    """A weak-typed float32 ``x`` (built from a Python scalar) pools to a float32 array that
    is not weak, eagerly and under jit alike, so it promotes the same way with bfloat16."""

    def f(v):
        return jaxconv.avg_pool(v, (2, 2)) * jnp.ones((1, 2, 2, 1), jnp.bfloat16)

    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        x = jnp.full((1, 4, 4, 1), 0.5)
        assert x.weak_type
        assert f(x).dtype == jax.jit(f)(x).dtype == jnp.float32
        assert not jax.eval_shape(lambda v: jaxconv.avg_pool(v, (2, 2)), x).weak_type


def test_seed_average_pool_of_c_is_the_window_mean():
    c = jnp.asarray(SEED_C)[..., None]
    y = jax.jit(lambda c: jaxconv.avg_pool(c, (2, 2), 1))(c)
    chex.assert_shape(y, (2, 2, 1))
    windows = np.lib.stride_tricks.sliding_window_view(SEED_C, (2, 2))
    np.testing.assert_allclose(y[..., 0], windows.mean(axis=(-1, -2)))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize(
    ("window", "stride", "padding"),
    [
        ((3, 3), 1, 1),  # one pass over the box
        ((20, 3), (20, 3), 0),  # tiling windows, the taps of the first axis in groups
        ((17, 2), 5, 0),  # one axis at a time, the taps of the first axis in groups
        ((18, 3), 4, (9, 1)),  # the same with padding: border blocks
        ((8, 8), 7, 0),  # one axis at a time, one group
    ],
)
def test_half_precision_accumulates_in_float32(dtype, window, stride, padding):
    x = np.random.default_rng(2).uniform(30000, 60000, (2, 41, 21, 3)).astype(np.float32)
    f = jax.jit(lambda x: jaxconv.avg_pool(x, window, stride, padding))
    y = f(jnp.asarray(x, dtype))
    chex.assert_type(y, dtype)
    chex.assert_tree_all_finite(y)
    expected = f(jnp.asarray(jnp.asarray(x, dtype), jnp.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=1e-2)


@pytest.mark.parametrize(
    ("shape", "window", "stride", "padding"),
    [
        ((2, 9, 8, 3), (3, 3), 1, 1),
        ((2, 9, 8, 3), (3, 3), 2, 1),
        ((2, 8, 8, 3), (2, 2), 2, 0),
        ((2, 33, 5), (3,), 2, 0),
        ((2, 33, 5), (3,), 1, 1),
        ((1, 5, 6, 5, 2), (3, 3, 3), 1, 1),
        ((2, 21, 20, 3), (6, 6), 5, 0),
        ((1, 13, 12, 11, 2), (4, 3, 3), 3, 1),
        ((2, 32, 16, 3), (16, 16), 16, 0),
    ],
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_is_the_float32_result_rounded_to_nearest_even(shape, window, stride, padding, dtype):
    """bfloat16 and float16 values and input gradients are the float32 ones rounded to nearest
    even (NaN, inf and sums beyond the 16-bit range included): the same bits, or the neighbour
    where XLA fused the float32 arithmetic differently (one ulp of float32 can cross a rounding
    tie). Reverse over reverse works."""
    rng = np.random.default_rng(len(shape) + stride + padding)
    x = rng.standard_normal(shape).astype(np.float32)
    big = 0.9 * float(jnp.finfo(dtype).max)  # sums of two overflow the 16-bit dtype
    x.reshape(-1)[rng.choice(x.size, 6, replace=False)] = [np.nan, np.inf, -np.inf, big, big, -big]
    xb = jnp.asarray(x, dtype)
    pool = lambda v: jaxconv.avg_pool(v, window, stride, padding)  # noqa: E731
    y, vjp = jax.vjp(pool, xb)
    cot = jnp.asarray(rng.standard_normal(y.shape), dtype)
    y32, vjp32 = jax.vjp(pool, xb.astype(jnp.float32))
    want = [np.asarray(y32), np.asarray(vjp32(cot.astype(jnp.float32))[0])]
    for got, expected in zip([y, jax.jit(lambda c: vjp(c)[0])(cot)], want, strict=True):
        chex.assert_type(got, dtype)
        got, expected = np.asarray(got), expected.astype(dtype)
        # NaN where float32 has NaN; its payload bits are the backend's (0x7FC0 or 0x7FFF)
        nan = np.isnan(expected)
        np.testing.assert_array_equal(np.isnan(got), nan)
        bits = got[~nan].view(np.uint16).astype(np.int32)
        want_bits = expected[~nan].view(np.uint16).astype(np.int32)
        assert np.abs(bits - want_bits).max() <= 1
        assert np.mean(bits == want_bits) > 0.99
    second = jax.jit(
        jax.grad(lambda v: jnp.sum(jax.grad(lambda u: jnp.sum(pool(u) * cot))(v) ** 2))
    )
    chex.assert_type(second(xb), dtype)


def test_vmap_and_batch_axes():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 2, 8, 8, 3)), jnp.float32)
    f = jax.jit(lambda x: jaxconv.avg_pool(x, (2, 2), 2, 1, count_include_pad=False))
    y = f(x)
    chex.assert_shape(y, (4, 2, 5, 5, 3))
    np.testing.assert_allclose(jax.vmap(f)(x), y, rtol=1e-6)
    np.testing.assert_allclose(f(x[0, 0]), y[0, 0], rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(f(x) ** 2))
    expected = grad(x)
    np.testing.assert_allclose(jax.vmap(grad)(x), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(jax.vmap(f)(x) ** 2))(x), expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"divisor_override": 0}, ValueError, "divisor_override"),
        ({"divisor_override": 2.0}, ValueError, "divisor_override"),
        ({"count_include_pad": 1}, TypeError, "count_include_pad"),
        ({"padding": 2}, ValueError, "padding"),
        ({"data_format": "NHWC"}, ValueError, "data_format"),
        ({"window": 2}, TypeError, "window"),
        ({"stride": (1, 0)}, ValueError, "stride"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    args = {"window": (3, 3), **kwargs}
    x = jnp.zeros((1, 6, 6, 2))
    with pytest.raises(error, match=rf"avg_pool.*{match}"):
        jaxconv.avg_pool(x, **args)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match=r"avg_pool.*floating"):
        jaxconv.avg_pool(jnp.zeros((1, 4, 4, 1), jnp.int32), (2, 2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(("window", "stride", "padding"), [((3, 3), 1, 1), ((2, 2), 2, 0)])
def test_values_near_the_bottom_of_the_range_keep_the_documented_bound(
    window, stride, padding, dtype
):
    """Taps are scaled by ``2^-e <= 1/k`` so no sum overflows; where the CPU flushes a scaled
    tap to zero, the mean is off by at most ``2^(e-126)`` (the docstring's bound), and is
    never negative for positive input."""
    rng = np.random.default_rng(5)
    x = np.exp(rng.uniform(np.log(1.2e-38), np.log(1e-35), (2, 6, 6, 3))).astype(np.float32)
    xd = jnp.asarray(x, dtype)
    got = np.asarray(jaxconv.avg_pool(xd, window, stride, padding), np.float64)
    want = np.asarray(jaxconv.avg_pool(jnp.asarray(xd, jnp.float64), window, stride, padding))
    e = int(np.ceil(np.log2(np.prod(window))))
    rounding = {jnp.float32: 2e-7, jnp.bfloat16: 8e-3}[dtype] * want
    assert (got >= 0).all()
    assert (np.abs(got - want) <= 2.0 ** (e - 126) + rounding).all()

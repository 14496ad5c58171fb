"""lp_pool: PyTorch where the definitions agree, a reference from the definition, the seed's
identities, the derivative rule (x and p) and its stability."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax import lax
from jax.test_util import check_grads

import jaxconv

TORCH_LP = {1: F.lp_pool1d, 2: F.lp_pool2d, 3: F.lp_pool3d}
TORCH_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
SEED_C = np.array([[109, 92, 72], [108, 85, 74], [110, 74, 79]], np.float64)
SPATIAL = {1: (12,), 2: (8, 9), 3: (6, 6, 5)}


def to_layout(x_cf, data_format):
    return x_cf if data_format == "channels_first" else np.moveaxis(x_cf, 1, -1)


def from_layout(y, data_format):
    return y if data_format == "channels_first" else np.moveaxis(y, -1, 1)


def reference_lp(x_cf, p, window, stride, pads, dilation, ceil_mode):
    """The p-norm of the in-bounds elements of every window of an (N, C, *spatial) array."""
    sizes = x_cf.shape[2:]
    outs = []
    for i, k, s, (lo, hi), d in zip(sizes, window, stride, pads, dilation, strict=True):
        out = (i + lo + hi - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
        outs.append(out - 1 if ceil_mode and (out - 1) * s >= i + lo else out)
    y = np.zeros(x_cf.shape[:2] + tuple(outs))
    for o in itertools.product(*(range(n) for n in outs)):
        ranges = [
            [q for q in range(oi * s - lo, oi * s - lo + d * k, d) if 0 <= q < i]
            for oi, i, k, s, (lo, _), d in zip(
                o, sizes, window, stride, pads, dilation, strict=True
            )
        ]
        block = np.abs(x_cf[(slice(None), slice(None), *np.ix_(*ranges))])
        block = block.reshape((*block.shape[:2], -1))
        value = block.max(-1) if np.isinf(p) else (block**p).sum(-1) ** (1 / p)
        y[(slice(None), slice(None), *o)] = value
    return y


def _lp(p, window, stride=None, padding=0, dilation=1, ceil_mode=False, fmt="channels_last"):
    def f(x, p=p):
        return jaxconv.lp_pool(
            x, p, window, stride, padding, dilation=dilation, ceil_mode=ceil_mode, data_format=fmt
        )

    return f


# (n, p, window, stride, data_format, positive): torch agrees for x >= 0, or even p on any x.
TORCH_CASES = [
    (1, 2.0, (3,), (2,), "channels_last", False),
    (1, 1.5, (4,), None, "channels_first", True),
    (2, 2.0, (2, 2), None, "channels_last", False),
    (2, 4.0, (3, 3), (2, 2), "channels_first", False),
    (2, 1.0, (3, 2), (1, 2), "channels_last", True),
    (2, 3.0, (2, 3), (2, 1), "channels_last", True),
    (3, 2.0, (2, 2, 2), None, "channels_last", False),
    (3, 2.5, (3, 2, 2), (1, 2, 1), "channels_first", True),
    (2, float("inf"), (3, 2), (2, 2), "channels_first", False),
    (2, 2.0, (6, 5), (2, 3), "channels_last", False),  # > BOX_LIMIT: axis by axis
    (2, 1.0, (5, 6), (3, 1), "channels_first", True),
]


@pytest.mark.parametrize("case", TORCH_CASES, ids=str)
def test_matches_torch_where_the_definitions_agree(case):
    n, p, window, stride, fmt, positive = case
    rng = np.random.default_rng(n)
    x_cf = rng.standard_normal((2, 3, *SPATIAL[n])).astype(np.float32)
    if positive:
        x_cf = np.abs(x_cf) + 0.1
    xt = torch.tensor(x_cf, requires_grad=True)
    if p == float("inf"):  # max |x|; torch's lp_pool gives it from 2.13 on (1 before)
        yt = TORCH_MAX[n](xt.abs(), window, stride)
    elif n == 1:  # lp_pool1d takes ints
        yt = TORCH_LP[n](xt, p, window[0], stride and stride[0])
    else:
        yt = TORCH_LP[n](xt, p, window, stride)
    g_cf = rng.standard_normal(yt.shape).astype(np.float32)
    yt.backward(torch.tensor(g_cf))

    y, vjp = jax.vjp(jax.jit(_lp(p, window, stride, fmt=fmt)), jnp.asarray(to_layout(x_cf, fmt)))
    (dx,) = vjp(jnp.asarray(to_layout(g_cf, fmt)))
    chex.assert_type([y, dx], jnp.float32)
    chex.assert_shape(y, to_layout(np.zeros(yt.shape), fmt).shape)
    np.testing.assert_allclose(from_layout(np.asarray(y), fmt), yt.detach(), rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(from_layout(np.asarray(dx), fmt), xt.grad, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("p", "window", "stride", "padding", "dilation", "ceil_mode"),
    [
        (3.0, (3, 3), (2, 2), 1, (1, 1), True),
        (1.5, (2, 3), (3, 2), ((1, 0), (0, 1)), (2, 1), True),
        (2.0, (3, 2), (1, 2), "SAME", (1, 2), False),
        (float("inf"), (3, 3), (2, 2), (1, 0), (2, 1), True),
        (1.0, (2, 2), (2, 2), 0, (1, 1), True),
        (3.0, (6, 5), (2, 1), (2, 1), (1, 1), True),
        (float("inf"), (5, 6), (3, 2), 0, (1, 1), True),
    ],
)
def test_padding_dilation_and_partial_windows_match_the_definition(
    p, window, stride, padding, dilation, ceil_mode
):
    x_cf = np.random.default_rng(0).standard_normal((2, 3, 9, 7))
    y = jax.jit(_lp(p, window, stride, padding, dilation, ceil_mode, "channels_first"))(x_cf)
    pads = jaxconv._src.arithmetic.resolve_padding(
        "test", padding, 2, kernel=window, stride=stride, dilation=dilation, in_sizes=(9, 7)
    )
    expected = reference_lp(x_cf, p, window, stride, pads, dilation, ceil_mode)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-12)


def test_seed_identity_p1_is_window_size_times_average():
    c = jnp.asarray(SEED_C)[..., None]
    lp1 = jax.jit(_lp(1.0, (2, 2), 1))(c)
    avg = jaxconv.avg_pool(c, (2, 2), 1)
    np.testing.assert_allclose(lp1, 4 * avg, rtol=1e-14)
    x = jnp.asarray(np.random.default_rng(4).uniform(0, 5, (2, 3, 7, 6, 4)))
    lp1 = jax.jit(_lp(1.0, (2, 3, 2), 1))(x)
    np.testing.assert_allclose(lp1, 12 * jaxconv.avg_pool(x, (2, 3, 2), 1), rtol=1e-13)


def test_seed_identity_large_p_tends_to_max_pooling():
    c = jnp.asarray(SEED_C)[..., None]
    expected_max = lax.reduce_window(c, -jnp.inf, lax.max, (2, 2, 1), (1, 1, 1), "VALID")
    np.testing.assert_array_equal(expected_max[..., 0], [[109, 92], [110, 85]])
    gaps = []
    for p in [1.0, 2.0, 4.0, 16.0, 64.0]:
        y = jax.jit(_lp(p, (2, 2), 1))(c)
        assert np.all(y >= expected_max) and np.all(y <= 4 ** (1 / p) * expected_max)
        gaps.append(float(jnp.max(y - expected_max)))
    assert all(a > b for a, b in itertools.pairwise(gaps))
    np.testing.assert_array_equal(jax.jit(_lp(float("inf"), (2, 2), 1))(c), expected_max)


def test_gradient_with_respect_to_p_matches_finite_differences():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 7, 6, 3)))
    f = jax.jit(lambda x, p: jnp.sum(_lp(p, (3, 2), (2, 1), 1, ceil_mode=True)(x) ** 2))
    for p in [1.0, 2.5, 7.0]:
        h = 1e-6
        fd = (f(x, jnp.float64(p + h)) - f(x, jnp.float64(p - h))) / (2 * h)
        grad = jax.grad(f, argnums=1)(x, jnp.float64(p))
        np.testing.assert_allclose(grad, fd, rtol=1e-6)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.5, 1500.0])
def test_check_grads_reverse_order_2_static_p(p):
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 9, 2)))
    check_grads(jax.jit(_lp(p, (3,), 2, 2, dilation=2, ceil_mode=True)), (x,), 2, modes=["rev"])


def test_check_grads_2d_dilated():
    x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 6, 5, 2)))
    check_grads(jax.jit(_lp(3.5, (3, 2), (2, 1), 1, dilation=(1, 2))), (x,), 1, modes=["rev"])


def test_check_grads_reverse_order_2_traced_p():
    x = jnp.asarray(np.random.default_rng(7).standard_normal((1, 7, 2)))
    f = jax.jit(lambda x, p: jaxconv.lp_pool(x, p, (3,), 2, 1, ceil_mode=True))
    check_grads(f, (x, jnp.float64(2.7)), 2, modes=["rev"])


def test_check_grads_p_inf_and_gradient_goes_to_the_first_max_abs():
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 6, 6, 2)))
    check_grads(jax.jit(_lp(float("inf"), (2, 3), 1)), (x,), 1, modes=["rev"])
    ties = jnp.array([[-3.0, 3.0], [3.0, -3.0]]).reshape(1, 2, 2, 1)
    g = jax.grad(lambda x: jnp.sum(_lp(float("inf"), (2, 2))(x)))(ties)
    np.testing.assert_array_equal(g[0, ..., 0], [[-1.0, 0.0], [0.0, 0.0]])
    ties = jnp.array([[1.0, -2.0], [2.0, -2.0]]).reshape(1, 2, 2, 1)
    g = jax.grad(lambda x: jnp.sum(_lp(float("inf"), (2, 2))(x)))(ties)
    np.testing.assert_array_equal(g[0, ..., 0], [[0.0, -1.0], [0.0, 0.0]])


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, float("inf"), "traced"])
def test_all_zero_windows_give_zero_value_and_gradient(p):
    x = jnp.zeros((1, 4, 4, 2), jnp.float32).at[0, 0, 0, 0].set(2.0)
    p_arg = jnp.float32(3.0) if p == "traced" else p
    f = jax.jit(lambda x, q: jnp.sum(jaxconv.lp_pool(x, q, (2, 2))))
    value = jaxconv.lp_pool(x, p_arg, (2, 2))
    assert value[0, 0, 0, 0] == 2.0 and jnp.all(value.at[0, 0, 0, 0].set(0) == 0)
    if p == "traced":
        gx, gp = jax.grad(f, argnums=(0, 1))(x, p_arg)
        assert np.isfinite(gp)
        gx2, gp2 = jax.grad(f, argnums=(0, 1))(jnp.zeros_like(x), p_arg)
        assert gp2 == 0 and jnp.all(gx2 == 0)
    else:
        gx = jax.grad(f)(x, p_arg)
    chex.assert_tree_all_finite(gx)
    np.testing.assert_array_equal(gx, jnp.zeros_like(x).at[0, 0, 0, 0].set(1.0))


@pytest.mark.parametrize("p", [2.0, 3.0, 1.5, 8.0, "traced"])
def test_huge_values_keep_their_norm_and_gradient(p):
    """Norms above 2^126 in float32, whose inverse is subnormal (read as zero on CPU)."""
    x64 = np.array([1e38, -2e37, 3e37, 3.0, 0.5, -1e-3])
    q = 2.5 if p == "traced" else p
    y64 = np.sum(np.abs(x64.reshape(2, 3)) ** q, axis=1) ** (1 / q)
    g64 = np.sign(x64) * (np.abs(x64) / np.repeat(y64, 3)) ** (q - 1)
    p_arg = jnp.float32(q) if p == "traced" else p
    f = jax.jit(lambda x, p: jaxconv.lp_pool(x, p, (3,)))
    x = jnp.asarray(x64, jnp.float32).reshape(1, 6, 1)
    np.testing.assert_allclose(f(x, p_arg).ravel(), y64, rtol=1e-5)
    g = jax.grad(lambda x: jnp.sum(f(x, p_arg)))(x)
    np.testing.assert_allclose(g.ravel(), g64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_does_not_overflow(dtype):
    x = jnp.full((1, 2, 2, 1), 300, dtype)
    y = jax.jit(_lp(2.0, (2, 2)))(x)
    chex.assert_type(y, dtype)
    np.testing.assert_allclose(np.float32(y[0, 0, 0, 0]), 600.0, rtol=1e-2)
    g = jax.grad(lambda x: jnp.sum(_lp(2.0, (2, 2))(x).astype(jnp.float32)))(x)
    chex.assert_type(g, dtype)
    np.testing.assert_allclose(np.asarray(g, np.float32), 0.5, rtol=1e-2)


@pytest.mark.parametrize("p", [64.0, 256.0])
def test_large_p_is_finite_and_close_to_the_max(p):
    x = np.random.default_rng(9).uniform(-1e30, 1e30, (1, 6, 6, 2)).astype(np.float32)
    y = jax.jit(_lp(p, (3, 3), 3))(x)
    expected = reference_lp(np.moveaxis(x, -1, 1).astype(np.float64) / 1e30, p, (3, 3), (3, 3),
                            ((0, 0), (0, 0)), (1, 1), False) * 1e30  # fmt: skip
    np.testing.assert_allclose(np.moveaxis(np.asarray(y), -1, 1), expected, rtol=1e-5)
    g = jax.grad(lambda x, q: jnp.sum(jaxconv.lp_pool(x, q, (3, 3))), argnums=(0, 1))(
        jnp.asarray(x), jnp.float32(p)
    )
    chex.assert_tree_all_finite(g)


@pytest.mark.parametrize("p", [2000.0, 1e5, 1e7, "traced"])
def test_large_p_gradients_keep_float32_accuracy(p):
    """float32 gradients over near-tied windows equal the float64 ones to float32 accuracy,
    although a power of ``|x|/y`` turns each rounding of the ratio into p of them."""
    rng = np.random.default_rng(13)
    q = 1e6 if p == "traced" else p
    base = np.repeat(np.repeat(rng.uniform(0.5, 2.0, (2, 4, 4, 3)), 2, 1), 2, 2)
    x = base * (1 - rng.uniform(0, 3 / q, base.shape)) * rng.choice([-1.0, 1.0], base.shape)
    x = x.astype(np.float32)
    ct = rng.standard_normal((2, 4, 4, 3))

    def loss(x, p):
        return jnp.sum(jaxconv.lp_pool(x, p, (2, 2), 2) * ct.astype(x.dtype))

    argnums = (0, 1) if p == "traced" else 0
    ps = (jnp.float32(q), jnp.float64(q)) if p == "traced" else (q, q)
    g32 = jax.grad(loss, argnums)(jnp.asarray(x), ps[0])
    g64 = jax.grad(loss, argnums)(jnp.asarray(x, jnp.float64), ps[1])
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g64), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6 * np.max(np.abs(b)))


def test_traced_p_gradient_beside_an_infinity_is_its_limit():
    """A window holding inf has norm inf; d/dx is 1 at the infinity and 0 at finite elements
    (sign(x) for p = 1, where the norm is a sum); NaN propagates."""
    x = jnp.array([[np.inf, 1.0, -2.0, 0.5], [3.0, 1.0, 0.0, np.nan]]).reshape(1, 2, 4, 1)

    def grad(p):
        y, vjp = jax.vjp(lambda x: jaxconv.lp_pool(x, p, (2, 2)), x)
        return vjp(jnp.ones_like(y))[0]

    for p, finite in [(3.0, 0.0), (1.0, 1.0)]:
        g = grad(jnp.float32(p))[0, ..., 0]
        np.testing.assert_array_equal(g[:, :2], [[1.0, finite], [finite, finite]])
        assert np.isnan(g[:, 2:]).all()


@pytest.mark.parametrize("p", [2.0, 3.0, 8.0, 100.0, 2000.0, float("inf")])
def test_static_p_gradient_beside_an_infinity_and_in_a_nan_window(p):
    """Finite elements of a window holding inf get a zero gradient, and every element of a
    window holding NaN gets NaN (the norm is NaN there), as with a traced ``p``. The infinity
    itself gets the limit 1 from the log form (p >= 1024); below, NaN (README, Known limits)."""
    x = jnp.array([[np.inf, 1.0, -2.0, 0.5], [3.0, 1.0, 0.0, np.nan]]).reshape(1, 2, 4, 1)
    y, vjp = jax.vjp(lambda x: jaxconv.lp_pool(x, p, (2, 2)), x)
    g = vjp(jnp.ones_like(y))[0][0, ..., 0]
    np.testing.assert_array_equal(g[:, :2].ravel()[1:], [0.0, 0.0, 0.0])
    assert np.isnan(g[:, 2:]).all()
    assert g[0, 0] == 1.0 if p >= 1024 else np.isnan(g[0, 0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
@pytest.mark.parametrize("p", ["traced", 3.0, 1024.0, 1e6])
def test_maxima_near_the_smallest_normal_number(dtype, p):
    """Windows whose largest element is 1 to 4 times the smallest normal number: the norm and
    its gradient are those of the same window scaled up (the log form took near-maximal
    elements for ties there, when their difference to the maximum was subnormal)."""
    tiny = float(jnp.finfo(jnp.float32 if dtype == jnp.bfloat16 else dtype).tiny)
    rng = np.random.default_rng(7)
    base = jnp.asarray(rng.uniform(1.0, 4.0, (2, 6, 1)), dtype)
    q = jnp.asarray(3.0, dtype if dtype != jnp.bfloat16 else jnp.float32) if p == "traced" else p

    def f(v):
        return jnp.sum(jaxconv.lp_pool(v, q, (3,), 3))

    small = (base.astype(jnp.float64) * tiny).astype(dtype)
    assert float(jnp.min(jnp.abs(small.astype(jnp.float64)))) >= tiny  # every element normal
    y, g = jax.value_and_grad(f)(small)
    y1, g1 = jax.value_and_grad(f)(base)
    rtol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(float(y) / tiny, float(y1), rtol=rtol)
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(g1, np.float64), rtol=rtol)


def test_jit_vmap_over_batch_and_over_p():
    x = jnp.asarray(np.random.default_rng(10).standard_normal((3, 2, 7, 7, 2)), jnp.float32)
    f = jax.jit(lambda x, p: jaxconv.lp_pool(x, p, (3, 3), 2, 1))
    y = f(x, jnp.float32(2.0))
    chex.assert_shape(y, (3, 2, 4, 4, 2))
    np.testing.assert_allclose(jax.vmap(f, (0, None))(x, jnp.float32(2.0)), y, rtol=1e-6)
    ps = jnp.array([1.0, 2.0, 4.0], jnp.float32)
    by_p = jax.vmap(f, (None, 0))(x[0], ps)
    x_cf = np.moveaxis(np.asarray(x[0], np.float64), -1, 1)
    for i, p in enumerate([1.0, 2.0, 4.0]):
        expected = reference_lp(x_cf, p, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), False)
        np.testing.assert_allclose(np.moveaxis(np.asarray(by_p[i]), -1, 1), expected, rtol=1e-5)
    grads = jax.vmap(jax.grad(lambda p, x: jnp.sum(f(x, p))), (0, None))(ps, x[0])
    chex.assert_shape(grads, (3,))
    chex.assert_tree_all_finite(grads)


def test_traced_p_inf_is_the_max_of_abs():
    """Value and gradient of a traced inf equal the static one's (no ties in the data), also
    where ``m * (1/m)`` rounds one unit below 1 (1.089)."""
    x = np.random.default_rng(11).standard_normal((2, 16, 16, 2)).astype(np.float32)
    x[0, 0, :2, 0] = [1.089, 0.2]
    x = jnp.asarray(x)

    def pooled(x, p):
        return jaxconv.lp_pool(x, p, (2, 2), 2)

    traced = jax.jit(pooled)(x, jnp.float32(np.inf))
    np.testing.assert_array_equal(traced, pooled(x, float("inf")))
    grad = jax.jit(jax.grad(lambda x, p: jnp.sum(pooled(x, p))))(x, jnp.float32(np.inf))
    np.testing.assert_array_equal(grad, jax.grad(lambda x: jnp.sum(pooled(x, float("inf"))))(x))


def test_forward_mode_is_not_supported():
    x = jnp.ones((1, 4, 4, 1))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(_lp(2.0, (2, 2)), (x,), (x,))


@pytest.mark.parametrize(
    ("p", "error", "match"),
    [
        (0.5, ValueError, ">= 1"),
        (float("nan"), ValueError, ">= 1"),
        (True, TypeError, "p"),
        ("2", TypeError, "p"),
        (jnp.array([2.0, 3.0]), TypeError, "scalar"),
        (jnp.array(2), TypeError, "floating"),
        (jnp.array(0.5), ValueError, ">= 1"),
        pytest.param(10**400, ValueError, "int of 1329 bits", id="int-beyond-float"),
    ],
)
def test_bad_p_raises_clear_errors(p, error, match):
    with pytest.raises(error, match=rf"lp_pool.*{match}"):
        jaxconv.lp_pool(jnp.ones((1, 4, 4, 1)), p, (2, 2))


def test_bad_x_and_window_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match=r"lp_pool.*floating"):
        jaxconv.lp_pool(jnp.ones((1, 4, 4, 1), jnp.int32), 2.0, (2, 2))
    with pytest.raises(ValueError, match=r"lp_pool.*padding"):
        jaxconv.lp_pool(jnp.ones((1, 4, 4, 1)), 2.0, (2, 2), padding=2)
    with pytest.raises(ValueError, match=r"lp_pool.*data_format"):
        jaxconv.lp_pool(jnp.ones((1, 4, 4, 1)), 2.0, (2, 2), data_format="NCHW")


def test_demo_pooling_walkthrough_reproduces_the_seed(capsys):
    from jaxconv._demo.seed_pooling import P_VALUES, pooling_walkthrough

    table = pooling_walkthrough(SEED_C)
    np.testing.assert_array_equal(table["max_pool"], [[109, 92], [110, 85]])
    assert table["identity_p1_holds"] and table["window_size"] == 4
    np.testing.assert_allclose(np.asarray(table["lp"][0]), 4 * np.asarray(table["avg_pool"]))
    assert list(table["p"]) == list(P_VALUES)
    gaps = table["gap_to_max"]
    assert all(a > b for a, b in itertools.pairwise(gaps)) and gaps[-1] == 0
    assert "MISMATCH" not in capsys.readouterr().out

"""adaptive_avg_pool and adaptive_max_pool against PyTorch's adaptive_{avg,max}_pool{1,2,3}d."""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.test_util import check_grads

import jaxconv

TORCH_AVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
TORCH_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


def to_layout(x_cf, data_format):
    return x_cf if data_format == "channels_first" else np.moveaxis(x_cf, 1, -1)


def from_layout(y, data_format):
    y = np.asarray(y)
    return y if data_format == "channels_first" else np.moveaxis(y, -1, 1)


def torch_adaptive(x_cf, g_avg, g_max, output_size):
    """PyTorch's avg values and grad, max values, indices and grad (cotangents given)."""
    n = len(output_size)
    tx = torch.tensor(x_cf, requires_grad=True)
    avg = TORCH_AVG[n](tx, output_size)
    (g_a,) = torch.autograd.grad(avg, tx, torch.tensor(g_avg))
    mx, idx = TORCH_MAX[n](tx, output_size, return_indices=True)
    (g_m,) = torch.autograd.grad(mx, tx, torch.tensor(g_max))
    return avg.detach().numpy(), g_a.numpy(), mx.detach().numpy(), idx.numpy(), g_m.numpy()


def jax_adaptive(output_size, data_format):
    """A jitted ``(x, g) -> (avg, avg grad, max, indices, max grad, max grad without indices)``.

    The max without indices takes its own path (see ``select.py``), so both gradients are checked.
    """

    def avg(x):
        return jaxconv.adaptive_avg_pool(x, output_size, data_format=data_format)

    def mx(x):
        return jaxconv.adaptive_max_pool(
            x, output_size, return_indices=True, data_format=data_format
        )

    def plain(x):
        return jaxconv.adaptive_max_pool(x, output_size, data_format=data_format)

    def run(x, g):
        a, avg_vjp = jax.vjp(avg, x)
        m, max_vjp, i = jax.vjp(mx, x, has_aux=True)
        _, plain_vjp = jax.vjp(plain, x)
        return a, avg_vjp(g)[0], m, i, max_vjp(g)[0], plain_vjp(g)[0]

    return jax.jit(run)


# (input spatial size, output_size, data_format, dtype): non-divisible, upsampling (Out > In),
# divisible, global, identity and None axes, on 1-D, 2-D and 3-D.
CASES = [
    ((13,), (5,), "channels_last", np.float32),
    ((7,), (12,), "channels_first", np.float64),
    ((24,), (6,), "channels_first", np.float32),
    ((50, 50), (7, 7), "channels_last", np.float32),
    ((16, 13), (4, 3), "channels_last", np.float64),
    ((10, 13), (4, 20), "channels_first", np.float64),
    ((9, 8), (None, 3), "channels_last", np.float64),
    ((7, 7), (1, 1), "channels_first", np.float32),
    ((7, 7), (1, 1), "channels_last", np.float64),
    ((4, 3, 5), (1, 1, 1), "channels_first", np.float64),
    ((5, 6, 7), (1, 1, None), "channels_last", np.float32),
    ((5, 6, 7), (1, None, 1), "channels_last", np.float32),
    ((3, 11), (8, 11), "channels_last", np.float32),
    ((5, 6, 7), (3, None, 9), "channels_first", np.float32),
    ((4, 4, 6), (2, 3, 5), "channels_last", np.float64),
    # windows of varying lengths, over 16 taps: one gather of all taps for the averages too
    ((100, 37), (7, 5), "channels_first", np.float32),
    ((90, 100), (7, 7), "channels_last", np.float32),  # 13-14 and 15-16 taps: two tap folds
    ((200,), (3,), "channels_last", np.float64),  # 68 taps: the value reduces the gather too
    ((31, 5, 23), (3, 2, 2), "channels_last", np.float64),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_torch(case):
    spatial, output_size, data_format, dtype = case
    rng = np.random.default_rng(CASES.index(case))
    x_cf = rng.integers(-3, 4, (2, 3, *spatial)).astype(dtype)  # many ties
    x_cf[1, 2].flat[1:3] = np.nan  # two NaN in one window: the last one wins
    out_spatial = tuple(s if o is None else o for s, o in zip(spatial, output_size, strict=True))
    g_cf = rng.standard_normal((2, 3, *out_spatial)).astype(dtype)
    ta, tga, tm, ti, tgm = torch_adaptive(x_cf, g_cf, g_cf, output_size)
    fn = jax_adaptive(output_size, data_format)
    a, ga, m, i, gm, gp = fn(
        jnp.asarray(to_layout(x_cf, data_format)), to_layout(g_cf, data_format)
    )
    chex.assert_shape([a, m, i], to_layout(np.empty((2, 3, *out_spatial)), data_format).shape)
    chex.assert_type([a, ga, m, gm], dtype)
    chex.assert_type(i, jnp.int32)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(from_layout(a, data_format), ta, rtol=tol, atol=tol)
    np.testing.assert_allclose(from_layout(ga, data_format), tga, rtol=tol, atol=tol)
    np.testing.assert_array_equal(from_layout(m, data_format), tm)
    np.testing.assert_array_equal(from_layout(i, data_format), ti)
    np.testing.assert_allclose(from_layout(gm, data_format), tgm, rtol=tol, atol=tol)
    np.testing.assert_allclose(from_layout(gp, data_format), tgm, rtol=tol, atol=tol)


def test_batch_axes_any_number():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 11, 4, 5)).astype(np.float32)  # batch (2, 3), H, W, C
    for pool in (jaxconv.adaptive_avg_pool, jaxconv.adaptive_max_pool):
        y = jax.jit(lambda v, p=pool: p(v, (4, 3)))(x)
        chex.assert_shape(y, (2, 3, 4, 3, 5))
        np.testing.assert_array_equal(y[0, 1], pool(x[0, 1], (4, 3)))  # no batch axes
        np.testing.assert_array_equal(y.reshape(6, 4, 3, 5), pool(x.reshape(6, 11, 4, 5), (4, 3)))


def test_equinox_disagreement_case():
    """50 -> 7: equinox's windows differ from PyTorch's; jaxconv's equal them."""
    rng = np.random.default_rng(0)
    x_cf = rng.standard_normal((1, 4, 50, 50)).astype(np.float32) * 10
    t_avg = F.adaptive_avg_pool2d(torch.tensor(x_cf), (7, 7)).numpy()
    t_max = F.adaptive_max_pool2d(torch.tensor(x_cf), (7, 7)).numpy()
    ours_avg = jaxconv.adaptive_avg_pool(x_cf, (7, 7), data_format="channels_first")
    ours_max = jaxconv.adaptive_max_pool(x_cf, (7, 7), data_format="channels_first")
    np.testing.assert_allclose(ours_avg, t_avg, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours_max, t_max)
    eqx_avg = eqx.filter_jit(eqx.nn.AdaptiveAvgPool2d((7, 7)))(jnp.asarray(x_cf[0]))
    assert np.abs(np.asarray(eqx_avg) - t_avg[0]).max() > 0.1  # the case discriminates


# lengths 15 and 16, 22 and 23 (winners by the tap fold); 67 and 68 (one variadic reduction)
LONG = [(100, 7), (150, 7), (200, 3)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, jnp.bfloat16])
@pytest.mark.parametrize(("size", "out"), LONG, ids=str)
def test_long_windows_nan_inf_and_ties_match_torch(size, out, dtype):
    """Windows of varying lengths gathered at once, whose shorter windows are padded with
    repeats of their last element: a NaN there, windows of -inf only and tied maxima keep
    PyTorch's values, indices (the last NaN, the first maximum) and gradients."""
    starts = np.arange(out) * size // out
    ends = -(-np.arange(1, out + 1) * size // out)
    rng = np.random.default_rng(size)
    x = rng.integers(-2, 3, (3, 2, size)).astype(np.float32)  # (N, C, L): ties everywhere
    short = np.flatnonzero(ends - starts < (ends - starts).max())
    x[0, 0, ends[short] - 1] = np.nan  # the last element of every shorter window
    x[0, 1, starts[short[0]] : ends[short[0]] - 1] = np.nan  # NaN then a finite last element
    x[1, 0] = -np.inf
    x[1, 1, : ends[0]] = np.nan
    tx = torch.tensor(x.astype(np.float64)).to(torch.bfloat16 if dtype == jnp.bfloat16 else None)
    tx = tx.to(torch.float32 if dtype == np.float32 else tx.dtype).requires_grad_()
    t_val, t_idx = F.adaptive_max_pool1d(tx, out, return_indices=True)
    g = rng.standard_normal(t_val.shape).astype(np.float32)
    (t_grad,) = torch.autograd.grad(t_val, tx, torch.tensor(g).to(tx.dtype))

    def pool(v):
        return jaxconv.adaptive_max_pool(
            v, (out,), return_indices=True, data_format="channels_first"
        )

    xj = jnp.asarray(x, dtype)
    (val, idx), vjp = jax.vjp(pool, xj)
    (grad,) = vjp((jnp.asarray(g, dtype), np.zeros(idx.shape, jax.dtypes.float0)))
    plain = jax.grad(
        lambda v: jnp.vdot(
            jaxconv.adaptive_max_pool(v, (out,), data_format="channels_first").astype(np.float32), g
        )
    )(xj)
    np.testing.assert_array_equal(np.asarray(val, np.float64), t_val.detach().double().numpy())
    np.testing.assert_array_equal(idx, t_idx.numpy())
    np.testing.assert_array_equal(np.asarray(grad, np.float64), t_grad.double().numpy())
    np.testing.assert_array_equal(np.asarray(plain, np.float64), t_grad.double().numpy())


@pytest.mark.parametrize("op", ["avg", "max"])
@pytest.mark.parametrize("order", [1, 2])
def test_check_grads_float64_long_windows(op, order):
    rng = np.random.default_rng(6)
    x = rng.permutation(61 * 3 * 2).reshape(1, 61, 3, 2).astype(np.float64) / 10  # no ties
    pool = jaxconv.adaptive_avg_pool if op == "avg" else jaxconv.adaptive_max_pool
    check_grads(jax.jit(lambda v: pool(v, (3, 2))), (x,), order, ("fwd", "rev"))  # 21, 22 taps


@pytest.mark.parametrize(
    ("shape", "output_size"),
    [((0, 13, 11, 2), (5, 4)), ((2, 13, 11, 0), (5, 4)), ((0, 7, 6, 5, 1), (3, 4, 2))],
    ids=str,
)
def test_empty_batch_or_channels_have_empty_gradients(shape, output_size):
    """Windows of varying lengths on every axis (the winners gathered at flat positions)."""
    for pool in (jaxconv.adaptive_max_pool, jaxconv.adaptive_avg_pool):
        y, vjp = jax.vjp(lambda v, p=pool: p(v, output_size), jnp.ones(shape))
        out = list(shape)
        out[1 : 1 + len(output_size)] = output_size
        chex.assert_shape(y, tuple(out))
        chex.assert_shape(vjp(y)[0], shape)


@pytest.mark.parametrize("return_indices", [False, True])
def test_long_window_of_signed_zeros_gives_plus_zero_or_pytorchs_zero(return_indices):
    """Windows of 68 taps (the value alone reduces the gathered window) whose maximum is a zero
    held as +0 and -0: the value alone is +0 or PyTorch's (the first zero's sign), never -0
    after a first +0, whatever the reduction order; with indices, PyTorch's value and index."""
    x = np.full((1, 203, 1), -1.0, np.float32)
    x[0, [3, 70, 140], 0] = 0.0
    x[0, [4, 71, 141], 0] = -0.0
    x[0, [69, 139], 0] = -0.0  # the second and third windows start with -0
    t_value, t_index = F.adaptive_max_pool1d(torch.tensor(x[..., 0]), 3, return_indices=True)
    got = jaxconv.adaptive_max_pool(x, (3,), return_indices=return_indices)
    sign = np.signbit(np.asarray(got[0] if return_indices else got)[..., 0])
    if return_indices:
        np.testing.assert_array_equal(sign, np.signbit(t_value.numpy()))
        np.testing.assert_array_equal(got[1][..., 0], t_index.numpy())
    else:
        assert not np.any(sign & ~np.signbit(t_value.numpy())), sign


GRAD_CASES = [
    ("avg", (12, 7), 1),
    ("avg", (3, 2), 2),  # 9 -> 3 tiles, 7 -> 2 is 4 at step 3: the regular windows' tangent
    ("avg", (1, 1), 2),
    ("max", (4, 3), 2),
    ("max", (12, 7), 1),
    ("max", (1, None), 1),
    ("max", (1, 1), 2),
]


@pytest.mark.parametrize(("op", "size", "order"), GRAD_CASES, ids=str)
def test_check_grads_float64(op, size, order):
    rng = np.random.default_rng(3)
    x = rng.permutation(9 * 7 * 2).reshape(1, 9, 7, 2).astype(np.float64) / 10  # no ties
    pool = jaxconv.adaptive_avg_pool if op == "avg" else jaxconv.adaptive_max_pool
    check_grads(jax.jit(lambda v: pool(v, size)), (x,), order, ("fwd", "rev"))


def test_vmap_and_jit_agree():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 10, 9, 4)).astype(np.float32)
    for pool in (jaxconv.adaptive_avg_pool, jaxconv.adaptive_max_pool):
        mapped = jax.vmap(jax.jit(lambda v, p=pool: p(v, (4, 5))))(x)
        direct = pool(x, (4, 5))
        np.testing.assert_allclose(mapped, direct, rtol=1e-6)


def test_identity_is_not_weak_typed():
    w = jnp.broadcast_to(jnp.asarray(2.0), (1, 6, 1))
    assert not jaxconv.adaptive_avg_pool(w, (6,)).weak_type


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision(dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 17, 13, 3)).astype(np.float32)
    xh = jnp.asarray(x, dtype)
    ref = jaxconv.adaptive_avg_pool(xh.astype(jnp.float32), (5, 4))
    avg = jax.jit(lambda v: jaxconv.adaptive_avg_pool(v, (5, 4)))(xh)
    mx = jax.jit(lambda v: jaxconv.adaptive_max_pool(v, (5, 4)))(xh)
    chex.assert_type([avg, mx], dtype)
    np.testing.assert_allclose(np.asarray(avg, np.float32), ref, rtol=1e-2, atol=1e-2)
    ref_max = jaxconv.adaptive_max_pool(xh.astype(jnp.float32), (5, 4))
    np.testing.assert_array_equal(np.asarray(mx, np.float32), ref_max)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize(
    ("shape", "output_size"),
    [((8, 13, 10, 16), (5, 7)), ((8, 17, 12, 16), (5, 4)), ((2, 10, 9, 5, 8), (7, 4, 3))],
    ids=str,
)
def test_half_precision_uneven_average_is_correctly_rounded(shape, output_size, dtype):
    """Sums of 16-bit values of one binade are exact in float32, and their means often lie
    exactly halfway between two 16-bit numbers: one division in float32, as PyTorch's, rounds
    them as PyTorch does in 1-D and 2-D, and as its float32 mean rounded in 3-D (PyTorch's 3-D
    16-bit kernel is less accurate: errors up to 0.045 at values of 8-16 in bfloat16, 1.4
    half-units). (Over values of many binades the float32 sums round, in another order than
    PyTorch's, and about 0.2% of float16 means differ by one unit.)"""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.choice([-1.0, 1.0], shape) * rng.uniform(1, 2, shape), dtype)
    xt = torch.tensor(np.moveaxis(np.asarray(x, np.float32), -1, 1))
    torch_pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
    torch_pool = torch_pool[len(output_size) - 1]
    torch_dtype = torch.float16 if dtype == jnp.float16 else torch.bfloat16
    got = jax.jit(lambda v: jaxconv.adaptive_avg_pool(v, output_size))(x)
    chex.assert_type(got, dtype)
    got = np.moveaxis(np.asarray(got, np.float32), -1, 1)
    rounded = torch_pool(xt, output_size).to(torch_dtype).float().numpy()
    np.testing.assert_array_equal(got, rounded)
    if len(output_size) < 3:
        same_dtype = torch_pool(xt.to(torch_dtype), output_size).float().numpy()
        np.testing.assert_array_equal(got, same_dtype)


MANY_TAPS = [
    ("adaptive_max_pool", (2, 40, 6, 3), {"output_size": (2, 3)}),  # tiling, 20 taps
    ("adaptive_max_pool", (2, 50, 6, 3), {"output_size": (3, 2)}),  # lengths 17, 18, 17
    ("adaptive_max_pool", (2, 64, 3), {"output_size": (2,)}),  # 1-D, 32 taps
    ("adaptive_max_pool", (1, 34, 4, 5, 2), {"output_size": (2, 2, 1)}),  # 3-D
    ("max_pool", (2, 32, 8, 3), {"window": (16, 2)}),  # tiling max pool window
    ("max_pool", (2, 250, 3), {"window": (100,)}),  # over 64 taps: one reduce_window
    ("adaptive_max_pool", (2, 150, 2, 3), {"output_size": (1, 1)}),  # global, 300 taps
    ("adaptive_max_pool", (2, 203, 3), {"output_size": (3,)}),  # gathered, 68 taps
]


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize(("name", "shape", "kwargs"), MANY_TAPS, ids=str)
def test_half_precision_max_over_many_taps_is_exact(name, shape, kwargs, dtype):
    """16-bit max over windows of more than 15 taps per axis (keyed in groups of taps) gives
    the float32 max of the same values: NaN, infinities and zeros of either sign included."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    spots = rng.choice(flat.size, 8, replace=False)
    flat[spots] = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-6, -1e4, np.nan]
    flat[rng.choice(flat.size, 40, replace=False)] = -0.0  # windows of zeros only, signs mixed
    xh = jnp.asarray(x, dtype)
    pool = jax.jit(lambda v: getattr(jaxconv, name)(v, **kwargs))
    got = np.asarray(pool(xh))
    want = np.asarray(pool(xh.astype(jnp.float32))).astype(dtype)
    chex.assert_type(got, dtype)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok], want[ok])


def test_large_values_stay_finite():
    x = jnp.full((1, 30, 1), 6e4, jnp.float16)  # a float16 sum would overflow
    np.testing.assert_array_equal(jaxconv.adaptive_avg_pool(x, (3,)), jnp.full((1, 3, 1), 6e4))
    rng = np.random.default_rng(9)
    big = rng.uniform(1e38, 3e38, (2, 12, 10, 2)).astype(np.float32)  # float32 sums overflow
    for size in [(4, 5), (5, 3), (1, 1)]:  # divisible (one reshape), masked taps, global
        y = jax.jit(lambda v, s=size: jaxconv.adaptive_avg_pool(v, s))(big)
        ref = F.adaptive_avg_pool2d(
            torch.tensor(np.moveaxis(big, -1, 1), dtype=torch.float64), size
        )
        np.testing.assert_allclose(y, np.moveaxis(ref.numpy(), 1, -1), rtol=1e-6)


@pytest.mark.parametrize("size", [(4, 5), (5, 3), (1, 1), (24, 20), (2, None)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_transpose_and_tangents_beside_the_overflow_rescue(size, dtype):
    """Where a float32 sum can overflow, the forward pass rescues it under a value-dependent
    ``lax.cond``; the adjoint is a primitive of its own, so ``jax.linear_transpose`` works and
    equals the float64 adjoint, and a tangent of huge values is averaged with the rescue."""
    rng = np.random.default_rng(3)
    # 60 -> 2: tiles of 30 elements, beyond the box sums (one reduction and the rescue)
    x = jnp.asarray(rng.standard_normal((2, 60 if size[1] is None else 12, 10, 3)), dtype)
    f = lambda v: jaxconv.adaptive_avg_pool(v, size)  # noqa: E731
    g = jnp.asarray(rng.standard_normal(f(x).shape), dtype)
    (got,) = jax.jit(jax.linear_transpose(f, x))(g)
    want = jax.vjp(f, x.astype(jnp.float64))[1](g.astype(jnp.float64))[0]
    assert got.dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)
    big = jnp.asarray(rng.uniform(1e38, 3e38, x.shape), dtype)
    _, tangent = jax.jvp(f, (x,), (big,))
    np.testing.assert_array_equal(tangent, f(big))
    assert np.all(np.isfinite(np.asarray(tangent, np.float64)))


def test_infinite_inputs_propagate():
    x = np.ones((1, 6, 1), np.float32)
    x[0, 1], x[0, 4], x[0, 5] = np.inf, np.inf, -np.inf
    y = jaxconv.adaptive_avg_pool(x, (2,))[0, :, 0]
    want = F.adaptive_avg_pool1d(torch.tensor(x[..., 0])[None], 2)[0, 0].numpy()
    np.testing.assert_array_equal(y, want)  # [inf, nan]


BAD = [
    ("adaptive_avg_pool", dict(output_size=(0, 2)), ValueError, "output_size"),
    ("adaptive_avg_pool", dict(output_size=2), TypeError, "output_size"),
    ("adaptive_avg_pool", dict(output_size=(2, 2, 2, 2)), ValueError, "x"),
    ("adaptive_avg_pool", dict(output_size=(2.0, 2)), ValueError, "output_size"),
    ("adaptive_avg_pool", dict(output_size=(), data_format="channels_last"), ValueError, "output"),
    ("adaptive_max_pool", dict(output_size=(2, 2), data_format="NHWC"), ValueError, "data_format"),
    ("adaptive_max_pool", dict(output_size=(2, 2), return_indices=1), TypeError, "return_indices"),
    ("adaptive_max_pool", dict(output_size=[None, -1]), ValueError, "output_size"),
]


@pytest.mark.parametrize(("name", "kwargs", "error", "arg"), BAD, ids=str)
def test_bad_arguments(name, kwargs, error, arg):
    x = jnp.ones((1, 5, 5, 2))
    with pytest.raises(error, match=f"^{name}: .*{arg}"):
        getattr(jaxconv, name)(x, **kwargs)
    with pytest.raises(error, match=f"^{name}: .*{arg}"):
        jax.jit(lambda v: getattr(jaxconv, name)(v, **kwargs))(x)


def test_integer_input_rejected():
    with pytest.raises(TypeError, match=r"^adaptive_max_pool: .*x"):
        jaxconv.adaptive_max_pool(jnp.ones((1, 5, 2), jnp.int32), (2,))

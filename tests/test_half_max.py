"""16-bit max pooling against PyTorch CPU in the same dtype, on NaN of either sign, +-inf, +-0, the
largest finite values, subnormals, ties and all -inf windows: values, indices and gradients,
forward mode and Hessians; and the sign of a maximum of -0, in float32 too."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from edge_support import HALF_DTYPES, op


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

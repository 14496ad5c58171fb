"""Ties, NaN and inf in max, average and Lp pooling: values, indices and where gradients go.

PyTorch CPU is the oracle where it computes the same thing (NaN/inf propagation, tie rules); Lp
pooling's values follow from the definition of the norm. Every op runs under ``jax.jit``.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from edge_support import op


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

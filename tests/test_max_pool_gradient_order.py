"""max_pool's gradient at ties and overlaps: it goes where PyTorch sends it, its second
derivatives follow the same winners, its sums run in PyTorch's window order and it is bitwise
reproducible."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxconv


def test_ties_send_the_gradient_to_the_first_max():
    """All-equal windows: each 2x2 stride-1 window sends its gradient to its top-left element."""
    x = np.ones((1, 1, 4, 5), np.float32)
    x[0, 0, 3, 4] = -1.0
    fn = jax.jit(
        jax.grad(lambda x: jnp.sum(jaxconv.max_pool(x, (2, 2), 1, data_format="channels_first")))
    )
    tx = torch.tensor(x, requires_grad=True)
    F.max_pool2d(tx, 2, 1).sum().backward()
    got = np.asarray(fn(jnp.asarray(x)))
    np.testing.assert_array_equal(got, tx.grad.numpy())
    expected = np.zeros((4, 5), np.float32)
    expected[:3, :4] = 1.0
    np.testing.assert_array_equal(got[0, 0], expected)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(
    "shape, pool",
    [
        ((1, 5, 1), lambda v, i: jaxconv.max_pool(v, (3,), 2, return_indices=i)),
        ((1, 5, 5, 1), lambda v, i: jaxconv.max_pool(v, (3, 3), 2, 1, return_indices=i)),
        ((1, 5, 1), lambda v, i: jaxconv.adaptive_max_pool(v, (2,), return_indices=i)),
    ],
    ids=["max 3 stride 2", "max 3x3 s2 p1", "adaptive 5 -> 2"],
)
def test_second_derivatives_at_ties_follow_the_first_winner(shape, pool, dtype):
    """Tied windows: the Hessian of sum(y**3) is that of the first winners picked by index
    (``-6`` on their diagonal here), with and without indices; a max of the taps in the
    tangent rule split the second derivative among the tied taps."""
    x = -jnp.ones(shape, dtype)
    _, index = pool(x, True)
    flat_x = x.reshape(x.shape[0], -1, 1)

    def picked(v):
        flat = v.reshape(flat_x.shape)
        return jnp.take_along_axis(flat, index.reshape(index.shape[0], -1, 1), axis=1)

    want = jax.hessian(lambda v: jnp.sum(picked(v) ** 3))(x)
    for with_index in (False, True):

        def f(v, i=with_index):
            y = pool(v, True)[0] if i else pool(v, False)
            return jnp.sum(y**3)

        np.testing.assert_array_equal(jax.jacfwd(jax.grad(f))(x), want)
        np.testing.assert_array_equal(jax.jit(jax.hessian(f))(x), want)


def test_gradient_is_bitwise_reproducible():
    x = jax.random.normal(jax.random.key(3), (4, 17, 15, 8))
    g = jax.random.normal(jax.random.key(4), (4, 9, 8, 8))

    def grad_fn():
        return jax.jit(lambda x: jax.vjp(lambda x: jaxconv.max_pool(x, (3, 3), 2, 1), x)[1](g)[0])

    a, b = grad_fn()(x), grad_fn()(x)
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize(
    ("shape", "pool"),
    [
        ((2, 23, 21, 5), dict(window=(5, 5), stride=2, padding=2)),
        ((2, 19, 20, 5), dict(window=(4, 3), stride=(3, 2), padding=1)),
        ((2, 40, 5), dict(window=(7,), stride=3, padding=3)),
        ((2, 9, 10, 11, 3), dict(window=(3, 3, 3), stride=2, padding=1)),
        ((2, 17, 20, 5), dict(window=(4, 4), stride=2, ceil_mode=True)),
        ((2, 23, 21, 5), dict(window=(4, 3), stride=(3, 2), padding=(2, 1), dilation=(2, 3))),
        ((2, 41, 5), dict(window=(10,), stride=4, padding=3, dilation=2, ceil_mode=True)),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_overlapping_windows_add_cotangents_in_pytorch_order(shape, pool, dtype):
    """Regular windows of more than 9 taps that overlap or read padding: on the CPU each input
    element sums the cotangents of the windows that chose it in their row-major order, so
    the gradient is PyTorch's bit for bit (its CPU kernel adds them that way)."""
    rng = np.random.default_rng(11)
    cpu = jax.devices("cpu")[0]  # the CPU's program on any host
    x = jax.device_put(rng.standard_normal(shape).astype(dtype), cpu)
    y, vjp = jax.vjp(lambda v: jaxconv.max_pool(v, **pool), x)
    g = jax.device_put(rng.standard_normal(y.shape).astype(dtype), cpu)
    got = jax.jit(vjp)(g)[0]
    with_indices = jax.vjp(lambda v: jaxconv.max_pool(v, **pool, return_indices=True)[0], x)[1]
    n = len(pool["window"])
    tx = torch.tensor(np.moveaxis(np.asarray(x), -1, 1), requires_grad=True)
    torch_pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    args = dict(pool, kernel_size=pool["window"], stride=pool.get("stride"))
    del args["window"]
    torch_pool(tx, **args).backward(torch.tensor(np.moveaxis(np.asarray(g), -1, 1)))
    want = np.moveaxis(tx.grad.numpy(), 1, -1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(with_indices(g)[0], want)
    batched = jax.vmap(lambda v, c: jax.vjp(lambda u: jaxconv.max_pool(u, **pool), v)[1](c)[0])
    np.testing.assert_array_equal(jax.jit(batched)(x[None], g[None])[0], want)


def test_one_element_winning_four_windows_sums_their_cotangents_in_window_order():
    """1 + 1e8 + 1 - 1e8 is 0 in float32 in the windows' row-major order (PyTorch's); summed
    axis by axis ((1 + 1) + (1e8 - 1e8)) it would be 2."""
    x = np.zeros((1, 6, 6, 1), np.float32)
    x[0, 2, 2, 0] = 1  # in windows 0 and 1 of both axes (kernel 4, stride 2)
    g = np.asarray([[1, 1e8], [1, -1e8]], np.float32).reshape(1, 2, 2, 1)
    with jax.default_device(jax.devices("cpu")[0]):  # the CPU's adjoint on any host
        f = jax.vjp(lambda v: jaxconv.max_pool(v, (4, 4), 2), jnp.asarray(x))[1]
        got = jax.jit(f)(jnp.asarray(g))[0]
    tx = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
    F.max_pool2d(tx, 4, 2).backward(torch.tensor(np.moveaxis(g, -1, 1)))
    np.testing.assert_array_equal(got, np.moveaxis(tx.grad.numpy(), 1, -1))
    assert got[0, 2, 2, 0] == 0


@pytest.mark.parametrize(
    ("shape", "pool", "torch_pool"),
    [
        ((1, 20, 22, 2), dict(window=(5, 5), stride=2, padding=2), None),
        ((1, 6, 8, 9, 2), dict(window=(3, 3, 3), stride=2, padding=1), None),
        ((1, 20, 22, 2), dict(window=(4, 3), stride=(3, 2), padding=(2, 1), dilation=(2, 3)), None),
        ((1, 20, 22, 2), dict(window=(3, 3), stride=2, padding=1), None),
        ((1, 21, 22, 2), dict(window=(2, 2)), None),
        ((1, 6, 8, 9, 2), dict(window=(2, 2, 2)), None),
        ((1, 20, 22, 2), dict(window=(4, 4)), None),
        ((1, 22, 22, 2), None, lambda t: F.adaptive_max_pool2d(t, 3)),  # kernel 8, stride 7
        ((1, 8, 8, 2), None, lambda t: F.adaptive_max_pool2d(t, 3)),  # lengths 3, 4, 3
    ],
)
def test_negative_zero_cotangents_leave_pytorch_positive_zeros(shape, pool, torch_pool):
    """PyTorch adds the cotangents to zeros, so a ``-0.0`` cotangent leaves ``+0.0``: the same
    bits here, where an element lies in one window only as well as in several, for windows
    that overlap, read padding, tile the input (2x2, 2x2x2, 4x4) or vary in length."""
    x = np.random.default_rng(12).standard_normal(shape).astype(np.float32)
    if pool is None:
        op = functools.partial(jaxconv.adaptive_max_pool, output_size=(3, 3))
    else:
        op = functools.partial(jaxconv.max_pool, **pool)
        args = {k: v for k, v in pool.items() if k != "window"}
        torch_pool = functools.partial(
            (F.max_pool2d, F.max_pool3d)[len(shape) - 4], kernel_size=pool["window"], **args
        )
    with jax.default_device(jax.devices("cpu")[0]):  # the CPU's adjoint on any host
        y, vjp = jax.vjp(op, jnp.asarray(x))
        got = np.asarray(jax.jit(vjp)(jnp.full(y.shape, -0.0, jnp.float32))[0])
    tx = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
    ty = torch_pool(tx)
    ty.backward(torch.full(ty.shape, -0.0))
    want = np.moveaxis(tx.grad.numpy(), 1, -1)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    assert not np.signbit(want).any()

"""max_unpool against PyTorch's max_unpool{1,2,3}d, its gradient, and its argument checks."""

import contextlib
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxconv

TORCH_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
TORCH_UNPOOL = {1: F.max_unpool1d, 2: F.max_unpool2d, 3: F.max_unpool3d}


def to_layout(x_cf, data_format):
    x_cf = np.asarray(x_cf)
    return x_cf if data_format == "channels_first" else np.moveaxis(x_cf, 1, -1)


def from_layout(y, data_format):
    y = np.asarray(y)
    return y if data_format == "channels_first" else np.moveaxis(y, -1, 1)


# (spatial, window, stride, padding, output_size, data_format); windows never overlap
# (stride >= window), so every output position has at most one writer. output_size is the
# pooled input's spatial size wherever the default differs (flat indices depend on the width).
CASES = [
    ((12,), (3,), None, 0, None, "channels_last"),
    ((11,), (2,), (3,), 1, (11,), "channels_first"),
    ((8, 9), (2, 2), None, 0, (8, 9), "channels_last"),
    ((9, 8), (3, 2), (3, 2), (1, 0), (9, 8), "channels_first"),
    ((8, 8), (2, 2), None, 0, "full", "channels_last"),
    ((6, 8, 6), (2, 2, 2), None, 0, None, "channels_first"),
    ((7, 6, 8), (3, 2, 2), (3, 2, 3), (1, 1, 0), (7, 6, 8), "channels_last"),
]


@contextlib.contextmanager
def one_torch_thread():
    """PyTorch's CPU max_unpool splits each plane's inputs across threads, so where several
    inputs name one position the winner varies from run to run on several threads (16 threads:
    2 or 3 of the 288 outputs of the foreign-index test below). On one thread the last wins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def last_write_wins(x_cf, idx_cf, sizes):
    """numpy reference: each plane written in row-major input order, so the last input wins."""
    out = np.zeros((*x_cf.shape[:2], math.prod(sizes)), x_cf.dtype)
    for plane, values, targets in zip(
        out.reshape(-1, out.shape[-1]),
        x_cf.reshape(out.shape[0] * out.shape[1], -1),
        idx_cf.reshape(out.shape[0] * out.shape[1], -1),
        strict=True,
    ):
        for value, target in zip(values, targets, strict=True):
            plane[target] = value
    return out.reshape(*x_cf.shape[:2], *sizes)


def torch_pool_unpool(x_cf, window, stride, padding, output_size, g_cf):
    n = len(window)
    y, i = TORCH_POOL[n](torch.tensor(x_cf), window, stride, padding, return_indices=True)
    ty = y.clone().requires_grad_(True)
    out = TORCH_UNPOOL[n](ty, i, window, stride, padding, output_size=output_size)
    if g_cf is None:
        return y.numpy(), i.numpy(), out.detach().numpy(), None
    (grad,) = torch.autograd.grad(out, ty, torch.tensor(g_cf))
    return y.numpy(), i.numpy(), out.detach().numpy(), grad.numpy()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_torch(case):
    spatial, window, stride, padding, output_size, data_format = case
    rng = np.random.default_rng(CASES.index(case))
    x_cf = rng.standard_normal((2, 3, *spatial)).astype(np.float32)
    stride_t = stride or window
    output_size_t = output_size
    if output_size == "full":  # the full output shape, batch and channel sizes included
        pooled = [(v - k) // st + 1 for v, k, st in zip(spatial, window, stride_t, strict=True)]
        default = [(p - 1) * st + k for p, k, st in zip(pooled, window, stride_t, strict=True)]
        output_size_t = (2, 3, *default)
        output_size = to_layout(np.zeros(output_size_t), data_format).shape
    _, _, out, _ = torch_pool_unpool(x_cf, window, stride_t, padding, output_size_t, None)
    g_cf = rng.standard_normal(out.shape).astype(np.float32)
    y, i, out, grad = torch_pool_unpool(x_cf, window, stride_t, padding, output_size_t, g_cf)

    def unpool(y, i):
        return jaxconv.max_unpool(
            y, i, window, stride, padding, output_size=output_size, data_format=data_format
        )

    fn = jax.jit(lambda y, i, g: (unpool(y, i), jax.vjp(lambda y: unpool(y, i), y)[1](g)[0]))
    got, got_grad = fn(
        to_layout(y, data_format), to_layout(i, data_format), to_layout(g_cf, data_format)
    )
    chex.assert_type([got, got_grad], jnp.float32)
    chex.assert_shape(got, to_layout(out, data_format).shape)
    np.testing.assert_array_equal(from_layout(got, data_format), out)
    np.testing.assert_allclose(from_layout(got_grad, data_format), grad, rtol=1e-6)


def test_round_trip_with_max_pool_indices():
    """max_unpool(max_pool(x)) keeps each window's max in place; its gradient gathers there."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))

    def round_trip(x):
        y, i = jaxconv.max_pool(x, (2, 3), return_indices=True)
        return jaxconv.max_unpool(y, i, (2, 3))

    out = jax.jit(round_trip)(x)
    y = jaxconv.max_pool(x, (2, 3))
    kept = out != 0
    np.testing.assert_array_equal(
        np.asarray(out)[np.asarray(kept)], np.asarray(x)[np.asarray(kept)]
    )
    np.testing.assert_array_equal(
        jnp.sum(kept, axis=(1, 2)), np.full((2, 3), y.shape[1] * y.shape[2])
    )
    g = jax.random.normal(jax.random.key(1), x.shape)
    _, i = jaxconv.max_pool(x, (2, 3), return_indices=True)
    grad = jax.grad(lambda y: jnp.sum(jaxconv.max_unpool(y, i, (2, 3)) * g))(y)
    g_planes = jnp.moveaxis(g, -1, 1).reshape(2, 3, -1)
    i_planes = jnp.moveaxis(i, -1, 1).reshape(2, 3, -1)
    expected = jnp.take_along_axis(g_planes, i_planes, axis=-1).reshape(2, 3, *y.shape[1:3])
    np.testing.assert_array_equal(grad, jnp.moveaxis(expected, 1, -1))


def test_duplicate_indices_last_write_wins():
    """Overlapping windows: the last input (row-major) naming a position wins, as PyTorch's CPU
    kernel does, and the inputs that lost get no gradient."""
    x = np.array([[[1.0, 5.0, 2.0, 7.0, 7.0, 3.0]]], np.float32)
    y, i = F.max_pool1d(torch.tensor(x), 3, 1, return_indices=True)
    assert len(set(i.flatten().tolist())) < i.numel()  # there are duplicates
    with one_torch_thread():
        expected = F.max_unpool1d(y, i, 3, 1).numpy()
    y_j, i_j = y.numpy(), i.numpy()

    def unpool(y):
        return jaxconv.max_unpool(y, i_j, (3,), 1, data_format="channels_first")

    np.testing.assert_array_equal(jax.jit(unpool)(y_j), expected)
    grad = jax.grad(lambda y: jnp.sum(unpool(y) * jnp.arange(1.0, 7.0, dtype=jnp.float32)))(
        jnp.asarray(y_j)
    )
    # windows [1,5,2] [5,2,7] [2,7,7] [7,7,3] -> indices 1, 3, 3, 3: inputs 1 and 2 lose to 3.
    np.testing.assert_array_equal(i_j[0, 0], [1, 3, 3, 3])
    np.testing.assert_array_equal(grad[0, 0], [2.0, 0.0, 0.0, 4.0])


@pytest.mark.parametrize("padding", [0, 1])
def test_tiling_windows_with_foreign_indices_match_torch(padding):
    """stride == window: indices that leave their own window (another window's position,
    duplicates across windows) take the scatter path and still match PyTorch, values and
    gradient; max pooling's own indices take the broadcast path."""
    rng = np.random.default_rng(11)
    y = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    out_sizes = (8 - 2 * padding, 10 - 2 * padding)
    volume = out_sizes[0] * out_sizes[1]
    own = F.max_pool2d(
        torch.tensor(rng.standard_normal((2, 3, *out_sizes)), dtype=torch.float32),
        2,
        2,
        padding,
        return_indices=True,
    )[1].numpy()
    foreign = own.copy()
    foreign[0, 0, 0, 0] = foreign[0, 0, 1, 1]  # a duplicate outside its own window
    foreign[1, 2] = rng.integers(0, volume, foreign[1, 2].shape)
    cot = rng.standard_normal((2, 3, *out_sizes)).astype(np.float32)
    for idx in (own, foreign):
        ty = torch.tensor(y, requires_grad=True)
        with one_torch_thread():
            t = F.max_unpool2d(ty, torch.tensor(idx), 2, 2, padding)
        (t * torch.tensor(cot)).sum().backward()
        np.testing.assert_array_equal(t.detach().numpy(), last_write_wins(y, idx, out_sizes))

        def unpool(y, idx=idx):
            return jaxconv.max_unpool(y, idx, (2, 2), 2, padding, data_format="channels_first")

        out, vjp = jax.vjp(jax.jit(unpool), jnp.asarray(y))
        np.testing.assert_array_equal(out, t.detach().numpy())
        # Where several inputs name a position, only the last (row-major) one gets gradient.
        want = ty.grad.numpy().reshape(6, -1)
        for plane, row in zip(idx.reshape(6, -1), want, strict=True):
            for j, target in enumerate(plane):
                if target in plane[j + 1 :]:
                    row[j] = 0.0
        np.testing.assert_allclose(vjp(jnp.asarray(cot))[0], want.reshape(y.shape), rtol=1e-6)


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_random_duplicates_last_write_wins(data_format):
    """Many inputs per output position, in 1-D to 3-D: the last input in row-major order wins,
    the same on every run."""
    rng = np.random.default_rng(5)
    for spatial in [(9,), (5, 7), (3, 4, 5)]:
        n = len(spatial)
        sizes = tuple(2 * v + 1 for v in spatial)  # 3-wide windows, stride 2
        x_cf = rng.standard_normal((2, 4, *spatial)).astype(np.float32)
        idx_cf = rng.integers(0, math.prod(sizes) // 3, x_cf.shape)  # a third of the positions
        unpool = jax.jit(
            lambda x, i, n=n: jaxconv.max_unpool(x, i, (3,) * n, 2, data_format=data_format)
        )
        x, idx = to_layout(x_cf, data_format), to_layout(idx_cf, data_format)
        want = last_write_wins(x_cf, idx_cf, sizes)
        for _ in range(3):
            np.testing.assert_array_equal(from_layout(unpool(x, idx), data_format), want)


def test_out_of_range_indices_are_dropped():
    y = jnp.ones((1, 1, 3))
    i = jnp.asarray([[[0, -1, 99]]])
    out = jax.jit(lambda y, i: jaxconv.max_unpool(y, i, (2,), data_format="channels_first"))(y, i)
    np.testing.assert_array_equal(out, [[[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])


def test_wide_indices_out_of_the_int32_range_are_dropped():
    """Tiling windows check int64 indices before narrowing them: 2**32 + i must not wrap to i."""
    x = jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)
    y, i = jaxconv.max_pool(x, (2, 2), return_indices=True)
    unpool = jax.jit(lambda y, i: jaxconv.max_unpool(y, i, (2, 2)))
    np.testing.assert_array_equal(unpool(y, i.astype(jnp.int64) + 2**32), jnp.zeros_like(x))
    np.testing.assert_array_equal(unpool(y, i.astype(jnp.uint32) + 2**31), jnp.zeros_like(x))
    np.testing.assert_array_equal(unpool(y, i.astype(jnp.int64)), unpool(y, i))


@pytest.mark.parametrize("window", [(2, 2), (3, 3)])
def test_numpy_int64_indices_stay_dropped_without_x64(window):
    """With int32 JAX integers, NumPy int64 indices past 2**31 (or below -2**31) must not wrap
    into range on conversion, for the tiling (2x2) and scatter (3x3, stride 2) forms alike."""
    x = np.arange(1.0, 17.0, dtype=np.float32).reshape(1, 4, 4, 1)
    with jax.enable_x64(False):
        y, i = jaxconv.max_pool(jnp.asarray(x), window, 2, return_indices=True)
        wide = np.asarray(i, np.int64)
        want = np.asarray(jaxconv.max_unpool(y, i, window, 2, output_size=(4, 4)))
        for shift in (2**32, -(2**32)):
            got = jaxconv.max_unpool(y, wide + shift, window, 2, output_size=(4, 4))
            assert got.dtype == jnp.float32
            np.testing.assert_array_equal(got, np.zeros_like(want))
        got = jaxconv.max_unpool(y, wide, window, 2, output_size=(4, 4))
        np.testing.assert_array_equal(got, want)
    assert np.count_nonzero(want) == y.size


def test_vmap_jvp_and_no_batch_axis():
    x = jax.random.normal(jax.random.key(2), (2, 3, 6, 4, 5))
    y, i = jaxconv.max_pool(x, (2, 2), return_indices=True)

    @jax.jit
    def unpool(y, i):
        return jaxconv.max_unpool(y, i, (2, 2))

    out = unpool(y, i)
    chex.assert_shape(out, x.shape)
    np.testing.assert_array_equal(jax.jit(jax.vmap(unpool))(y, i), out)
    np.testing.assert_array_equal(jax.jit(jax.vmap(jax.vmap(unpool)))(y, i), out)
    np.testing.assert_array_equal(unpool(y[0, 0], i[0, 0]), out[0, 0])
    np.testing.assert_array_equal(unpool(y, i.astype(jnp.int64)), out)
    t = jax.random.normal(jax.random.key(3), y.shape)
    _, tangent = jax.jit(lambda y, t: jax.jvp(lambda y: unpool(y, i), (y,), (t,)))(y, t)
    np.testing.assert_array_equal(tangent, unpool(t, i))
    y1, i1 = y[0, 0, :1, :1], jnp.zeros((1, 1, 5), jnp.int32)
    hess = jax.jit(jax.hessian(lambda v: jnp.sum(unpool(v, i1) ** 2)))(y1)
    np.testing.assert_array_equal(hess.reshape(5, 5), 2 * np.eye(5, dtype=np.float32))


F32, I32 = jnp.float32, jnp.int32
OK = ((1, 2, 2, 3), F32, (1, 2, 2, 3), I32)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize(("window", "stride"), [((2, 2), 2), ((3, 3), 2)])
def test_half_precision_values_jvp_and_gradient(window, stride, dtype):
    """16-bit values, jvp and gradient are float32's in the dtype, in the tiling (select) and
    the overlapping (scatter) form; vmap too."""
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 9, 9, 3)), dtype)
    values, idx = jaxconv.max_pool(x, window, stride, return_indices=True)

    def unpool(v):
        return jaxconv.max_unpool(v, idx, window, stride)

    cot = jnp.asarray(np.random.default_rng(9).standard_normal(unpool(values).shape), dtype)
    tan = jnp.asarray(np.random.default_rng(10).standard_normal(values.shape), dtype)
    (y, t), (y32, t32) = [
        jax.jit(lambda v, tv: jax.jvp(unpool, (v,), (tv,)))(v, tv)
        for v, tv in [(values, tan), (values.astype(jnp.float32), tan.astype(jnp.float32))]
    ]
    g = jax.jit(lambda v: jax.vjp(unpool, v)[1](cot)[0])(values)
    g32 = jax.vjp(unpool, values.astype(jnp.float32))[1](cot.astype(jnp.float32))[0]
    chex.assert_type([y, t, g], dtype)
    for got, want in [(y, y32), (t, t32), (g, g32)]:
        np.testing.assert_array_equal(
            np.asarray(got, np.float32), np.asarray(want.astype(dtype), np.float32)
        )
    batched = jax.vmap(lambda v, i: jaxconv.max_unpool(v, i, window, stride))(values, idx)
    np.testing.assert_array_equal(np.asarray(batched, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize(
    "arrays, rest, kwargs, error, match",
    [
        (((1, 2, 2, 3), I32, (1, 2, 2, 3), I32), (), {}, TypeError, "`x` must be a floating"),
        (((1, 2, 2, 3), F32, (1, 2, 2, 3), F32), (), {}, TypeError, "`indices` must be an int"),
        (((1, 2, 2, 3), F32, (1, 2, 3, 3), I32), (), {}, ValueError, "`indices` must have"),
        (OK, (), {"output_size": (4,)}, ValueError, "`output_size` must have"),
        (OK, (), {"output_size": (6, 4)}, ValueError, "out of range"),
        (OK, (), {"output_size": (2, 4)}, ValueError, "out of range"),
        (OK, (), {"output_size": (1, 4, 4, 2)}, ValueError, "batch and channel"),
        (OK, (), {"output_size": 4}, TypeError, "`output_size` must be None"),
        (OK, (), {"output_size": (4.0, 4)}, TypeError, "must contain ints"),
        (OK, (None, "SAME"), {}, ValueError, "`padding`"),
        (OK, (None, 3), {}, ValueError, "sizes must be >= 1.*`padding`"),
        (OK, (0,), {}, ValueError, "`stride`"),
        (OK, (), {"data_format": "NCHW"}, ValueError, "`data_format`"),
    ],
)
def test_bad_arguments(arrays, rest, kwargs, error, match):
    x_shape, x_dtype, i_shape, i_dtype = arrays
    x, indices = jnp.zeros(x_shape, x_dtype), jnp.zeros(i_shape, i_dtype)
    with pytest.raises(error, match="max_unpool: .*" + match):
        jax.jit(lambda x, i: jaxconv.max_unpool(x, i, (2, 2), *rest, **kwargs))(x, indices)


def test_window_must_be_a_sequence():
    with pytest.raises(TypeError, match="max_unpool: `window`"):
        jaxconv.max_unpool(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3), I32), 2)

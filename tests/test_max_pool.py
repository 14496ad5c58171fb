"""max_pool against PyTorch's max_pool{1,2,3}d and a numpy reference written from the definition."""

import functools
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

TORCH_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
SPATIAL = {1: (13,), 2: (9, 8), 3: (7, 6, 5)}
SEED_C = np.array([[109, 92, 72], [108, 85, 74], [110, 74, 79]], np.float32)


def to_layout(x_cf: np.ndarray, data_format: str) -> np.ndarray:
    """An (N, C, *spatial) array in ``data_format``."""
    return x_cf if data_format == "channels_first" else np.moveaxis(x_cf, 1, -1)


def from_layout(y, data_format: str) -> np.ndarray:
    y = np.asarray(y)
    return y if data_format == "channels_first" else np.moveaxis(y, -1, 1)


def tied_input(rng, n: int, dtype=np.float32) -> np.ndarray:
    """(2, 3, *spatial) small integers (many ties), one plane all -inf, one with a -inf entry."""
    x = rng.integers(-3, 4, (2, 3, *SPATIAL[n])).astype(dtype)
    x[0, 1] = -np.inf
    x[1, 2].flat[3] = -np.inf
    return x


def torch_max(x_cf, g_cf, window, stride, padding, dilation, ceil_mode):
    """PyTorch's values, indices and input gradient for cotangent ``g_cf``."""
    tx = torch.tensor(x_cf, requires_grad=True)
    fn = TORCH_MAX[len(window)]
    y, i = fn(tx, window, stride, padding, dilation, ceil_mode, return_indices=True)
    ct = torch.ones_like(y) if g_cf is None else torch.tensor(g_cf)
    (grad,) = torch.autograd.grad(y, tx, ct)
    return y.detach().numpy(), i.numpy(), grad.numpy()


def jax_max_fn(window, stride, padding, dilation, ceil_mode, data_format):
    """A jitted ``(x, g) -> (values, indices, grad via indices path, grad via plain path)``."""
    kw = dict(dilation=dilation, ceil_mode=ceil_mode, data_format=data_format)

    def with_indices(x):
        return jaxconv.max_pool(x, window, stride, padding, return_indices=True, **kw)

    def plain(x):
        return jaxconv.max_pool(x, window, stride, padding, **kw)

    def run(x, g):
        y, vjp, i = jax.vjp(with_indices, x, has_aux=True)
        y2, vjp2 = jax.vjp(plain, x)
        return y, i, vjp(g)[0], y2, vjp2(g)[0]

    return jax.jit(run)


# (n, window, stride, padding, dilation, ceil_mode, data_format): a sample of the grid that covers
# every feature on every dimensionality.
TORCH_CASES = [
    (1, (3,), None, 0, 1, False, "channels_last"),
    (1, (4,), (2,), 2, 1, True, "channels_first"),
    (1, (3,), (1,), 1, 3, False, "channels_last"),
    (1, (2,), (3,), 1, 2, True, "channels_last"),
    (2, (2, 2), None, 0, 1, False, "channels_last"),
    (2, (3, 3), (2, 2), 1, 1, False, "channels_last"),
    (2, (3, 3), (2, 2), 1, 1, True, "channels_first"),
    (2, (3, 2), (2, 1), (1, 0), (2, 1), True, "channels_last"),
    (2, (3, 3), (1, 1), 1, 2, False, "channels_first"),
    (2, (2, 3), (3, 2), (1, 1), (3, 2), True, "channels_last"),
    (2, (1, 1), (2, 2), 0, 1, True, "channels_first"),
    (3, (2, 2, 2), None, 0, 1, False, "channels_last"),
    (3, (3, 3, 3), (2, 2, 2), 1, 1, True, "channels_first"),
    (3, (3, 2, 3), (1, 2, 2), (1, 1, 0), (1, 2, 1), True, "channels_last"),
    (3, (2, 3, 2), (2, 1, 3), (1, 0, 1), 2, False, "channels_last"),
]


@pytest.mark.parametrize("case", TORCH_CASES, ids=str)
def test_matches_torch(case):
    n, window, stride, padding, dilation, ceil_mode, data_format = case
    rng = np.random.default_rng(len(window) * 100 + TORCH_CASES.index(case))
    x_cf = tied_input(rng, n)
    fn = jax_max_fn(window, stride, padding, dilation, ceil_mode, data_format)
    ty, _, _ = torch_max(x_cf, None, window, stride or window, padding, dilation, ceil_mode)
    g_cf = rng.standard_normal(ty.shape).astype(np.float32)
    ty, ti, tgrad = torch_max(x_cf, g_cf, window, stride or window, padding, dilation, ceil_mode)
    y, i, grad, y2, grad2 = fn(
        jnp.asarray(to_layout(x_cf, data_format)), to_layout(g_cf, data_format)
    )
    chex.assert_type([y, y2, grad, grad2], jnp.float32)
    chex.assert_type(i, jnp.int32)
    np.testing.assert_array_equal(from_layout(y, data_format), ty)
    np.testing.assert_array_equal(from_layout(y2, data_format), ty)
    np.testing.assert_array_equal(from_layout(i, data_format), ti)
    np.testing.assert_allclose(from_layout(grad, data_format), tgrad, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_layout(grad2, data_format), tgrad, rtol=1e-5, atol=1e-5)


def test_dilated_gradient_matches_torch():
    """XLA's own reduce_window max has no VJP with window dilation; jaxconv's rule does."""
    rng = np.random.default_rng(7)
    x_cf = rng.standard_normal((2, 3, 11, 10)).astype(np.float32)
    args = ((3, 3), (1, 2), (1, 1), (2, 3), False)
    ty, _, _ = torch_max(x_cf, None, *args)
    g_cf = rng.standard_normal(ty.shape).astype(np.float32)
    _, _, tgrad = torch_max(x_cf, g_cf, *args)
    fn = jax_max_fn(*args, "channels_first")
    grad = fn(jnp.asarray(x_cf), jnp.asarray(g_cf))[4]
    np.testing.assert_allclose(grad, tgrad, rtol=1e-5, atol=1e-6)


def test_long_axis_matches_torch():
    """Axes of 127 or more positions switch the winner's position dtype from int8 to int16."""
    rng = np.random.default_rng(11)
    x_cf = rng.integers(-5, 6, (2, 3, 300)).astype(np.float32)
    args = ((7,), (3,), 3, 2, True)
    ty, _, _ = torch_max(x_cf, None, *args)
    g_cf = rng.standard_normal(ty.shape).astype(np.float32)
    ty, ti, tgrad = torch_max(x_cf, g_cf, *args)
    y, i, grad, y2, grad2 = jax_max_fn(*args, "channels_first")(jnp.asarray(x_cf), g_cf)
    np.testing.assert_array_equal(y, ty)
    np.testing.assert_array_equal(y2, ty)
    np.testing.assert_array_equal(i, ti)
    np.testing.assert_allclose(grad, tgrad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad2, tgrad, rtol=1e-5, atol=1e-6)


def out_size(i, k, s, pad, d, ceil_mode):
    """PyTorch's pooling output size (Pool.h) with padding ``(lo, hi)``."""
    lo, hi = pad
    out = (i + lo + hi - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    return out - 1 if ceil_mode and (out - 1) * s >= i + lo else out


def same_pads(sizes, window, stride, dilation):
    """ "SAME": ceil(i/s) outputs, the odd padding element on the high side."""
    pads = []
    for i, k, s, d in zip(sizes, window, stride, dilation, strict=True):
        total = max((-(-i // s) - 1) * s + d * (k - 1) + 1 - i, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def reference_max(x_cf, window, stride, pads, dilation, ceil_mode):
    """Values and flat indices of max pooling an (N, C, *spatial) array, from the definition:
    scan each window in row-major order, skip padding, take a value when it is larger or NaN."""
    sizes = x_cf.shape[2:]
    outs = [
        out_size(*a, ceil_mode) for a in zip(sizes, window, stride, pads, dilation, strict=True)
    ]
    y = np.full(x_cf.shape[:2] + tuple(outs), np.nan)
    idx = np.full(y.shape, -1, np.int64)
    for o in itertools.product(*(range(m) for m in outs)):
        best, where = None, None
        for j in itertools.product(*(range(k) for k in window)):
            pos = [
                oi * s - lo + ji * d
                for oi, ji, s, (lo, _), d in zip(o, j, stride, pads, dilation, strict=True)
            ]
            if not all(0 <= p < i for p, i in zip(pos, sizes, strict=True)):
                continue
            v = x_cf[(slice(None), slice(None), *pos)]
            flat = np.ravel_multi_index(tuple(pos), sizes)
            win = np.ones(v.shape, bool) if best is None else (v > best) | np.isnan(v)
            best = v if best is None else np.where(win, v, best)
            where = np.full(v.shape, flat) if where is None else np.where(win, flat, where)
        y[(slice(None), slice(None), *o)] = best
        idx[(slice(None), slice(None), *o)] = where
    return y, idx


def reference_grad(x_cf, idx, g_cf):
    planes = x_cf.shape[0] * x_cf.shape[1]
    grad = np.zeros((planes, int(np.prod(x_cf.shape[2:]))))
    for p, (ii, gg) in enumerate(
        zip(idx.reshape(planes, -1), g_cf.reshape(planes, -1), strict=True)
    ):
        np.add.at(grad[p], ii, gg)
    return grad.reshape(x_cf.shape)


# (window, stride, padding, dilation, ceil_mode): asymmetric pairs and "SAME", against numpy.
PAIR_CASES = [
    ((3, 3), (2, 2), ((1, 0), (0, 1)), (1, 1), False),
    ((3, 2), (1, 2), ((0, 1), (1, 1)), (2, 1), True),
    ((4, 3), (2, 3), "SAME", (1, 1), False),
    ((3, 3), (1, 1), "SAME", (2, 3), False),
    ((2, 3), (3, 2), "SAME", (3, 1), True),
    ((3, 2), (2, 1), "VALID", (1, 2), True),
]


@pytest.mark.parametrize("case", PAIR_CASES, ids=str)
def test_pairs_and_same_against_reference(case):
    window, stride, padding, dilation, ceil_mode = case
    rng = np.random.default_rng(PAIR_CASES.index(case))
    x_cf = tied_input(rng, 2, np.float64)
    x_cf[1, 0, 2, 3] = np.nan
    sizes = x_cf.shape[2:]
    if isinstance(padding, str):
        pads = same_pads(sizes, window, stride, dilation) if padding == "SAME" else [(0, 0)] * 2
    else:
        pads = padding
    ry, ri = reference_max(x_cf, window, stride, pads, dilation, ceil_mode)
    g_cf = rng.standard_normal(ry.shape)
    fn = jax_max_fn(window, stride, padding, dilation, ceil_mode, "channels_last")
    y, i, grad, _, _ = fn(
        jnp.asarray(to_layout(x_cf, "channels_last")), to_layout(g_cf, "channels_last")
    )
    np.testing.assert_array_equal(from_layout(y, "channels_last"), ry)
    np.testing.assert_array_equal(from_layout(i, "channels_last"), ri)
    np.testing.assert_allclose(
        from_layout(grad, "channels_last"), reference_grad(x_cf, ri, g_cf), rtol=1e-12, atol=1e-12
    )


def test_nan_propagates_like_torch():
    rng = np.random.default_rng(3)
    x_cf = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
    x_cf[0, 0, 1, 1] = np.nan
    x_cf[0, 0, 1, 2] = np.nan
    x_cf[0, 1, 5, 4] = np.nan
    x_cf[0, 1, 7, 7] = np.inf
    args = ((3, 3), (2, 2), 1, 1, False)
    ty, _, _ = torch_max(x_cf, None, *args)
    g_cf = rng.standard_normal(ty.shape).astype(np.float32)
    ty, ti, tgrad = torch_max(x_cf, g_cf, *args)
    y, i, grad, y2, _ = jax_max_fn(*args, "channels_first")(jnp.asarray(x_cf), jnp.asarray(g_cf))
    assert np.isnan(ty).any()
    np.testing.assert_array_equal(y, ty)
    np.testing.assert_array_equal(y2, ty)
    np.testing.assert_array_equal(i, ti)
    np.testing.assert_allclose(grad, tgrad, rtol=1e-6)


def test_seed_max_pool():
    """The seed's max pooling of C with kernel 2, stride 1."""
    y = jax.jit(lambda c: jaxconv.max_pool(c[..., None], (2, 2), 1)[..., 0])(SEED_C)
    np.testing.assert_array_equal(y, [[109, 92], [110, 85]])


def distinct_input(shape, seed):
    """Values 0.1 apart in random order: no ties, no kink within finite-difference reach."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.permutation(np.prod(shape)).reshape(shape) * 0.1, jnp.float64)


@pytest.mark.parametrize(
    "window, stride, padding, dilation",
    [
        ((3,), 2, 1, 1),
        ((3, 2), (2, 1), (1, 0), (1, 2)),
        ((2, 2, 2), 1, 1, 1),
        ((4, 4), 2, 1, 1),  # more than 9 taps: a reduce_window per axis
        ((3, 3, 3), 2, 1, 1),
        ((4, 3), (3, 2), (2, 1), (2, 3)),  # the same, dilated
    ],
)
def test_check_grads(window, stride, padding, dilation):
    x = distinct_input((1, *(min(v, 6) for v in SPATIAL[len(window)]), 2), len(window))

    def f(x):
        return jaxconv.max_pool(x, window, stride, padding, dilation=dilation)

    def with_indices(x):
        pool = jaxconv.max_pool(x, window, stride, padding, dilation=dilation, return_indices=True)
        return pool[0]

    check_grads(jax.jit(f), (x,), order=2, modes=("fwd", "rev"))
    check_grads(jax.jit(with_indices), (x,), order=1, modes=("fwd", "rev"))


def test_jvp_picks_the_tangent_at_the_indices():
    x = distinct_input((2, 9, 8, 3), 0)
    t = jax.random.normal(jax.random.key(0), x.shape, x.dtype)
    fn = jax.jit(lambda x, t: jax.jvp(lambda x: jaxconv.max_pool(x, (3, 3), 2, 1), (x,), (t,)))
    y, ty = fn(x, t)
    _, i = jaxconv.max_pool(x, (3, 3), 2, 1, return_indices=True)
    t_planes = jnp.moveaxis(t, -1, 1).reshape(2, 3, -1)
    i_planes = jnp.moveaxis(i, -1, 1).reshape(2, 3, -1)
    expected = jnp.take_along_axis(t_planes, i_planes, axis=-1).reshape(2, 3, *y.shape[1:3])
    np.testing.assert_array_equal(ty, jnp.moveaxis(expected, 1, -1))


def test_hessian_vector_product_matches_torch():
    """f(x) = sum(max_pool(x)**2): H v = 2 P^T P v with P the selection of the winners."""
    rng = np.random.default_rng(5)
    x_cf = rng.standard_normal((2, 3, 9, 8))
    v_cf = rng.standard_normal(x_cf.shape)
    args = dict(window=(3, 2), stride=(2, 1), padding=1, dilation=(1, 2))

    def f(x):
        y = jaxconv.max_pool(
            x,
            args["window"],
            args["stride"],
            args["padding"],
            dilation=args["dilation"],
            data_format="channels_first",
        )
        return jnp.sum(y**2)

    hvp = jax.jit(lambda x, v: jax.jvp(jax.grad(f), (x,), (v,))[1])(
        jnp.asarray(x_cf), jnp.asarray(v_cf)
    )
    tx = torch.tensor(x_cf, requires_grad=True)
    y, i = F.max_pool2d(
        tx, args["window"], args["stride"], args["padding"], args["dilation"], return_indices=True
    )
    pv = torch.gather(torch.tensor(v_cf).flatten(2), 2, i.flatten(2)).reshape(y.shape)
    (expected,) = torch.autograd.grad(y, tx, 2 * pv)
    np.testing.assert_allclose(hvp, expected.numpy(), rtol=1e-12, atol=1e-12)


def test_vmap_and_batch_axes():
    x = distinct_input((2, 3, 7, 6, 4), 1)

    def pool(x):
        return jaxconv.max_pool(x, (3, 2), (2, 2), 1, return_indices=True)

    fn = jax.jit(pool)
    y, i = fn(x)
    chex.assert_shape([y, i], (2, 3, 4, 4, 4))
    for vy, vi in [jax.jit(jax.vmap(pool))(x), jax.jit(jax.vmap(jax.vmap(pool)))(x)]:
        np.testing.assert_array_equal(vy, y)
        np.testing.assert_array_equal(vi, i)
    flat_y, flat_i = fn(x.reshape(6, 7, 6, 4))
    np.testing.assert_array_equal(flat_y.reshape(y.shape), y)
    np.testing.assert_array_equal(flat_i.reshape(i.shape), i)
    no_batch = fn(x[0, 0])
    np.testing.assert_array_equal(no_batch[0], y[0, 0])
    np.testing.assert_array_equal(no_batch[1], i[0, 0])
    g = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(pool(x)[0] ** 2))))(x)
    np.testing.assert_array_equal(g, jax.grad(lambda x: jnp.sum(pool(x)[0] ** 2))(x))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_keeps_dtype(dtype):
    rng = np.random.default_rng(2)
    x32 = rng.standard_normal((2, 9, 8, 3)).astype(np.float32)
    x = jnp.asarray(x32, dtype)
    fn = jax.jit(lambda x: jaxconv.max_pool(x, (3, 3), 2, 1, return_indices=True))
    y, _ = fn(x)
    y32, _ = fn(x.astype(jnp.float32))
    chex.assert_type(y, dtype)
    np.testing.assert_array_equal(y.astype(jnp.float32), y32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jaxconv.max_pool(x, (3, 3), 2, 1))))(x)
    chex.assert_type(grad, dtype)
    assert np.isfinite(np.asarray(grad, np.float32)).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(window=(5, 5)), ValueError, "window.*larger"),
        (dict(window=(2, 2), padding=2), ValueError, "padding"),
        (dict(window=(2, 2), padding=-1), ValueError, "padding"),
        (dict(window=(3, 3), padding="FULL"), ValueError, "padding"),
        (dict(window=(2, 2), stride=0), ValueError, "stride"),
        (dict(window=(2, 2), dilation=(1, 0)), ValueError, "dilation"),
        (dict(window=2), TypeError, "window"),
        (dict(window=(2, 2, 2, 2, 2)), ValueError, "x"),
        (dict(window=(2, 2), data_format="NHWC"), ValueError, "data_format"),
        (dict(window=(2, 2), return_indices=1), TypeError, "return_indices"),
        (dict(window=(2, 2), ceil_mode="yes"), TypeError, "ceil_mode"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    x = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(error, match="max_pool: .*" + match):
        jax.jit(lambda x: jaxconv.max_pool(x, **kwargs))(x)


def test_non_float_input_raises():
    with pytest.raises(TypeError, match="max_pool: `x` must be a floating"):
        jaxconv.max_pool(jnp.zeros((1, 4, 4, 2), jnp.int32), (2, 2))


def test_window_of_padding_only_gives_minus_inf_index_minus_one_and_zero_gradient():
    # Length 1, k=2, d=2, padding 1: the window reads positions -1 and 1, both padding.
    x = jnp.asarray([[[1.0], [2.0]]]).reshape(1, 2, 1, 1)  # H=2, W=1, channels_last
    pool = functools.partial(
        jaxconv.max_pool, window=(1, 2), padding=(0, 1), dilation=(1, 2), return_indices=True
    )
    values, index = jax.jit(pool)(x)
    np.testing.assert_array_equal(values, np.full((1, 2, 1, 1), -np.inf, np.float32))
    np.testing.assert_array_equal(index, np.full((1, 2, 1, 1), -1, np.int32))
    grad = jax.grad(lambda x: jnp.sum(jnp.where(jnp.isinf(pool(x)[0]), 0.0, pool(x)[0])))(x)
    np.testing.assert_array_equal(grad, np.zeros_like(x))
    unpooled = jaxconv.max_unpool(values, index, (1, 2), padding=(0, 1), output_size=(2, 1))
    np.testing.assert_array_equal(unpooled, np.zeros((1, 2, 1, 1), np.float32))

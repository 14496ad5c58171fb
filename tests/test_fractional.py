"""fractional_max_pool against PyTorch: values, indices and gradients, 16-bit samples, output
ratios and 1-D; PyTorch's start sequences (the bands the tangent pick reads, strict increase,
16-bit rounding); argument errors of fractional_max_pool and fractional_max_pool_graham."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxconv
from jaxconv._src.fractional import _alpha, torch_starts
from jaxconv._src.fractional_plan import band_holds

TORCH_FRACTIONAL = {2: F.fractional_max_pool2d, 3: F.fractional_max_pool3d}


def to_layout(x_cf, data_format):
    return x_cf if data_format == "channels_first" else np.moveaxis(x_cf, 1, -1)


def from_layout(y, data_format):
    y = np.asarray(y)
    return y if data_format == "channels_first" else np.moveaxis(y, -1, 1)


def torch_samples(u):
    """jaxconv's samples (spatial axis 0 first) in PyTorch's ``_random_samples`` order."""
    return u[..., ::-1].copy() if u.shape[-1] == 2 else u


def jax_fractional(window, output_size, data_format):
    def pool(x, u):
        return jaxconv.fractional_max_pool(
            x,
            window,
            output_size=output_size,
            samples=u,
            return_indices=True,
            data_format=data_format,
        )

    def plain(x, u):
        return jaxconv.fractional_max_pool(
            x, window, output_size=output_size, samples=u, data_format=data_format
        )

    def run(x, u, g):
        y, vjp, i = jax.vjp(lambda v: pool(v, u), x, has_aux=True)
        _, plain_vjp = jax.vjp(lambda v: plain(v, u), x)  # its own path, without indices
        return y, i, vjp(g)[0], plain_vjp(g)[0]

    return jax.jit(run)


# (input spatial, window, output_size, data_format, dtype): 2-D and 3-D, out == 1, k == 1, the
# tightest fit out + k - 1 == in (2-D; PyTorch's 3-D check is stricter) and loose fits.
CASES = [
    ((10, 9), (2, 2), (4, 5), "channels_last", np.float32),
    ((13, 7), (3, 2), (11, 6), "channels_first", np.float64),
    ((8, 11), (1, 3), (1, 4), "channels_last", np.float64),
    ((25, 31), (2, 3), (12, 14), "channels_first", np.float32),
    ((16, 12), (2, 2), (8, 6), "channels_last", np.float32),  # ratio 0.5: integer alpha
    ((6, 6), (3, 3), (1, 1), "channels_last", np.float32),
    ((7, 8, 9), (2, 2, 2), (5, 4, 7), "channels_first", np.float32),
    ((9, 6, 10), (3, 1, 2), (3, 5, 8), "channels_last", np.float64),
]


def assert_matches_torch(x_cf, u, g_cf, window, output_size, data_format):
    """Output, indices and input gradient (with and without indices) equal PyTorch's."""
    n, dtype = len(window), x_cf.dtype
    tx = torch.tensor(x_cf, requires_grad=True)
    ty, ti = TORCH_FRACTIONAL[n](
        tx,
        window,
        output_size=output_size,
        _random_samples=torch.tensor(torch_samples(u)),
        return_indices=True,
    )
    (tg,) = torch.autograd.grad(ty, tx, torch.tensor(g_cf))
    fn = jax_fractional(window, output_size, data_format)
    y, i, g, gp = fn(jnp.asarray(to_layout(x_cf, data_format)), u, to_layout(g_cf, data_format))
    chex.assert_type([y, g], dtype)
    chex.assert_type(i, jnp.int32)
    chex.assert_equal_shape([y, i])
    np.testing.assert_array_equal(from_layout(y, data_format), ty.detach().numpy())
    np.testing.assert_array_equal(from_layout(i, data_format), ti.numpy())
    np.testing.assert_allclose(from_layout(g, data_format), tg.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(from_layout(gp, data_format), tg.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_torch(case):
    spatial, window, output_size, data_format, dtype = case
    rng = np.random.default_rng(CASES.index(case))
    x_cf = rng.integers(-4, 5, (2, 3, *spatial)).astype(dtype)  # ties
    x_cf[1, 0].flat[2:4] = np.nan  # two NaN in a window: the last one wins
    u = rng.random((2, 3, len(spatial))).astype(dtype)
    g_cf = rng.standard_normal((2, 3, *output_size)).astype(dtype)
    assert_matches_torch(x_cf, u, g_cf, window, output_size, data_format)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("off_grid", [False, True])
def test_integer_alpha_on_and_off_the_grid(off_grid, data_format):
    """2x2 windows at ratio 0.5 have alpha = 2: start i is 2i (a regular max pool) unless the
    rounding of ``(i + u) * alpha`` moves a start, as a sample just below 1 does. Both cases
    match PyTorch."""
    rng = np.random.default_rng(5)
    x_cf = rng.integers(-4, 5, (2, 3, 16, 12)).astype(np.float32)
    x_cf[0, 1].flat[5:7] = np.nan
    u = (rng.random((2, 3, 2)) * 0.5).astype(np.float32)
    if off_grid:
        u[1, 2, 0] = np.nextafter(np.float32(1), np.float32(0))
    starts = np.asarray(torch_starts(jnp.asarray(u[..., 0]), 16, 8, 2))
    assert np.any(starts != 2 * np.arange(8)) == off_grid
    g_cf = rng.standard_normal((2, 3, 8, 6)).astype(np.float32)
    assert_matches_torch(x_cf, u, g_cf, (2, 2), (8, 6), data_format)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize(("dtype", "tdtype"), [(jnp.bfloat16, torch.bfloat16)])
def test_half_precision_integer_alpha_gradient_matches_torch(dtype, tdtype, data_format):
    """bfloat16 samples move many starts of alpha = 2 windows off the grid (``i + u`` rounds to
    a coarse step); output, indices and gradient still equal PyTorch's. Small integers keep
    ties and make the sums of overlapping windows' cotangents exact."""
    rng = np.random.default_rng(12)
    x_cf = rng.integers(-4, 5, (3, 4, 40, 36)).astype(np.float32)
    u = rng.random((3, 4, 2)).astype(np.float32)
    g_cf = rng.integers(-8, 9, (3, 4, 20, 18)).astype(np.float32)
    starts = np.asarray(torch_starts(jnp.asarray(u[..., 0], dtype), 40, 20, 2))
    assert np.any(starts != 2 * np.arange(20))  # off the grid
    tx = torch.tensor(x_cf).to(tdtype).requires_grad_()
    tu = torch.tensor(torch_samples(u)).to(tdtype)
    ty, ti = F.fractional_max_pool2d(tx, 2, (20, 18), _random_samples=tu, return_indices=True)
    (tg,) = torch.autograd.grad(ty, tx, torch.tensor(g_cf).to(tdtype))
    fn = jax_fractional((2, 2), (20, 18), data_format)
    args = (to_layout(x_cf, data_format), u, to_layout(g_cf, data_format))
    y, i, g, gp = fn(*(jnp.asarray(a, dtype) for a in args))
    chex.assert_type([y, g, gp], dtype)
    np.testing.assert_array_equal(from_layout(i, data_format), ti.numpy())
    for got, want in ((y, ty), (g, tg), (gp, tg)):
        want = want.detach().to(torch.float32).numpy()
        np.testing.assert_array_equal(np.float32(from_layout(got, data_format)), want)


@pytest.mark.parametrize(
    ("dtype", "tdtype"), [(jnp.float16, torch.float16), (jnp.bfloat16, torch.bfloat16)]
)
def test_half_precision_sequences_match_torch(dtype, tdtype):
    rng = np.random.default_rng(11)
    x_cf = rng.standard_normal((4, 5, 37, 29))
    u = rng.random((4, 5, 2)) * 0.99
    tu = torch.tensor(torch_samples(u)).to(tdtype)
    ty, ti = F.fractional_max_pool2d(
        torch.tensor(x_cf).to(tdtype),
        (3, 2),
        output_size=(17, 20),
        _random_samples=tu,
        return_indices=True,
    )
    y, i = jax.jit(
        lambda v, s: jaxconv.fractional_max_pool(
            v,
            (3, 2),
            output_size=(17, 20),
            samples=s,
            return_indices=True,
            data_format="channels_first",
        )
    )(jnp.asarray(x_cf, dtype), jnp.asarray(u, dtype))
    chex.assert_type(y, dtype)
    np.testing.assert_array_equal(i, ti.numpy())
    np.testing.assert_array_equal(np.asarray(y, np.float32), ty.to(torch.float32).numpy())


def test_output_ratio_and_1d():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 20, 15, 4)).astype(np.float32)
    cases = [
        ((2, 2), 0.5, (3, 10, 7, 4)),
        ((2, 3), (0.7, 0.4), (3, 14, 6, 4)),
        ((2, 2), np.float32(0.5), (3, 10, 7, 4)),  # NumPy scalars are ratios too
        ((2, 3), (np.float64(0.7), np.float32(0.4)), (3, 14, 6, 4)),
    ]
    for window, ratio, shape in cases:
        pool = jax.jit(
            lambda v, k, w=window, r=ratio: jaxconv.fractional_max_pool(v, w, output_ratio=r, key=k)
        )
        chex.assert_shape(pool(x, jax.random.key(0)), shape)
    x1 = rng.standard_normal((2, 11, 3)).astype(np.float32)  # 1-D: same sequence rule
    u = rng.random((2, 3, 1)).astype(np.float32)
    y1, i1 = jax.jit(
        lambda v, s: jaxconv.fractional_max_pool(
            v, (3,), output_size=5, samples=s, return_indices=True
        )
    )(x1, u)
    ty, ti = F.fractional_max_pool2d(
        torch.tensor(np.moveaxis(x1, -1, 1))[..., None],
        (3, 1),
        output_size=(5, 1),
        _random_samples=torch.tensor(np.concatenate([np.zeros_like(u), u], -1)),
        return_indices=True,
    )
    np.testing.assert_array_equal(np.moveaxis(np.asarray(y1), -1, 1), ty[..., 0].numpy())
    np.testing.assert_array_equal(np.moveaxis(np.asarray(i1), -1, 1), ti[..., 0].numpy())


# Errors.

X = np.ones((2, 9, 8, 3), np.float32)
U = np.full((2, 3, 2), 0.5, np.float32)
BAD = [
    (dict(window=(2, 2), samples=U), ValueError, "output_size"),
    (dict(window=(2, 2), output_size=3, output_ratio=0.5, samples=U), ValueError, "output_ratio"),
    (dict(window=(2, 2), output_size=(9, 3), samples=U), ValueError, "output_size"),
    (dict(window=(2, 2), output_ratio=1.0, samples=U), ValueError, "output_ratio"),
    (dict(window=(2, 2), output_ratio=(0.5, -0.1), samples=U), ValueError, "output_ratio"),
    (dict(window=(2, 2), output_ratio=0.05, samples=U), ValueError, "output_ratio"),
    (dict(window=(2, 2), output_size=3), ValueError, "key"),
    (dict(window=(2, 2), output_size=3, samples=U, key=jax.random.key(0)), ValueError, "samples"),
    (dict(window=(2, 2), output_size=3, samples=U[:, :, :1]), ValueError, "samples"),
    (dict(window=(2, 2), output_size=3, samples=U + 0.5), ValueError, "samples"),
    (dict(window=(2, 2), output_size=3, samples=U - 0.6), ValueError, "samples"),
    (dict(window=(2, 2), output_size=3, key=jnp.ones(3, jnp.float32)), TypeError, "key"),
    (dict(window=2, output_size=3, samples=U), TypeError, "window"),
    (dict(window=(2, 0), output_size=3, samples=U), ValueError, "window"),
]


@pytest.mark.parametrize(("kwargs", "error", "arg"), BAD, ids=str)
def test_bad_arguments(kwargs, error, arg):
    with pytest.raises(error, match=rf"^fractional_max_pool: .*{arg}"):
        jaxconv.fractional_max_pool(X, **kwargs)
    with pytest.raises(error, match=rf"^fractional_max_pool: .*{arg}"):
        jax.jit(lambda v: jaxconv.fractional_max_pool(v, **kwargs))(X)


GRAHAM_BAD = [
    (dict(key=jax.random.key(0)), ValueError, "output_size"),
    (
        dict(output_size=(4, 4), output_ratio=(0.5, 0.5), key=jax.random.key(0)),
        ValueError,
        "output",
    ),
    (dict(output_size=(10, 4), key=jax.random.key(0)), ValueError, "output_size"),
    (dict(output_size=4, key=jax.random.key(0)), TypeError, "output_size"),
    (dict(output_ratio=(0.5, 1.5), key=jax.random.key(0)), ValueError, "output_ratio"),
    (dict(output_ratio=0.5, key=jax.random.key(0)), TypeError, "output_ratio.*one entry per"),
    (dict(output_size=(4, 4), key=None), TypeError, "key"),
    (dict(output_size=(4, 4), key=jax.random.key(0), overlapping=1), TypeError, "overlapping"),
    (dict(output_size=(4, 4), key=jax.random.key(0), pseudo_random="y"), TypeError, "pseudo"),
]


@pytest.mark.parametrize(("kwargs", "error", "arg"), GRAHAM_BAD, ids=str)
def test_graham_bad_arguments(kwargs, error, arg):
    with pytest.raises(error, match=rf"^fractional_max_pool_graham: .*{arg}"):
        jaxconv.fractional_max_pool_graham(X, **kwargs)


def test_graham_pseudo_random_limit():
    """The pseudo-random sequence's int32 arithmetic needs in * out below 2**30 (the random one
    has no such limit)."""
    x = jnp.zeros((1, 40000, 1), jnp.float32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"^fractional_max_pool_graham: .*2\*\*30.*30000"):
        jaxconv.fractional_max_pool_graham(x, output_size=(30000,), key=key, pseudo_random=True)
    out = jaxconv.fractional_max_pool_graham(x, output_size=(30000,), key=key)
    assert out.shape == (1, 30000, 1)
    small = jaxconv.fractional_max_pool_graham(x, output_size=(26000,), key=key, pseudo_random=True)
    assert small.shape == (1, 26000, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_integer_alpha_starts_stay_in_the_band(dtype):
    """With ``alpha = (in - k)/(out - 1) = A`` an integer, start ``i`` is in ``[(i-1)A, (i+1)A]``,
    the band the tangent pick relies on; samples include the largest value below 1."""
    rng = np.random.default_rng(9)
    top = np.nextafter(dtype(1), dtype(0))
    u = np.concatenate([[0, 0.5, top, np.nextafter(top, dtype(0))], rng.random(500)]).astype(dtype)
    for a, k, out in [(1, 2, 40), (2, 2, 28), (2, 3, 300), (3, 2, 17), (5, 4, 1000)]:
        start = np.asarray(torch_starts(jnp.asarray(u), (out - 1) * a + k, out, k))
        rel = start - (np.arange(out) - 1) * a
        assert rel.min() >= 0 and rel.max() <= 2 * a, (a, k, out)


@pytest.mark.parametrize(("dtype", "exact"), [(jnp.bfloat16, 256), (jnp.float16, 2048)])
def test_half_precision_band_holds_up_to_exact_integers(dtype, exact):
    """16-bit starts of integer-alpha windows stay in the band for every sample in [0, 1) while
    the dtype holds every integer up to the axis size (the tangent pick's condition); on a
    longer axis they leave it, so the tangent gathers there."""
    u = np.arange(2**16, dtype=np.uint16).view(np.dtype(dtype))
    u = jnp.asarray(u[(u.astype(np.float32) >= 0) & (u.astype(np.float32) < 1)])
    starts = jax.jit(torch_starts, static_argnums=(1, 2, 3))

    def rel(a, k, out):
        return np.asarray(starts(u, (out - 1) * a + k, out, k)) - (np.arange(out) - 1) * a

    for a, k in [(1, 2), (2, 2), (3, 3)]:
        out = (exact - k) // a + 1  # the longest axis within `exact`
        assert band_holds((out - 1) * a + k, dtype)
        inside = rel(a, k, out)
        assert inside.min() >= 0 and inside.max() <= 2 * a, (a, k, out)
    assert not band_holds(exact + 1, dtype)
    outside = rel(2, 2, 4 * exact)
    assert outside.min() < 0 or outside.max() > 4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_integer_alpha_starts_stay_in_the_band(dtype):
    """Start ``i`` of non-integer ``alpha`` lies in ``[floor(i*alpha) - 1, floor(i*alpha) + 2]``
    (the band the tangent pick reads), for samples near every fraction of ``1/alpha`` too."""
    rng = np.random.default_rng(14)
    for size, k, out, n in [(56, 2, 39, 3000), (56, 3, 27, 3000), (1000, 4, 777, 300)]:
        alpha = (size - k) / (out - 1)
        near = np.arange(1, int(alpha) + 2) / alpha  # u*alpha near an integer
        near = np.concatenate([near, np.nextafter(near, 0), np.nextafter(near, 2)])
        u = np.concatenate([rng.random(n), near[near < 1], [0.0]]).astype(dtype)
        start = np.asarray(torch_starts(jnp.asarray(u), size, out, k))
        base = np.arange(out) * (size - k) // (out - 1)
        first = start - base + 1
        assert band_holds(size, dtype, integer_alpha=False)
        assert first.min() >= 0 and first.max() <= 3, (size, k, out)


@pytest.mark.parametrize(("dtype", "exact"), [(jnp.bfloat16, 256), (jnp.float16, 2048)])
def test_half_precision_non_integer_band(dtype, exact):
    """Every 16-bit sample in [0, 1): the band holds up to a quarter of the exact integers."""
    u = np.arange(2**16, dtype=np.uint16).view(np.dtype(dtype))
    u = jnp.asarray(u[(u.astype(np.float32) >= 0) & (u.astype(np.float32) < 1)])
    size = exact // 4
    assert band_holds(size, dtype, integer_alpha=False)
    assert not band_holds(size + 1, dtype, integer_alpha=False)
    for k, out in [(2, size // 2 + 3), (3, size // 3 + 1)]:
        start = np.asarray(jax.jit(torch_starts, static_argnums=(1, 2, 3))(u, size, out, k))
        first = start - np.arange(out) * (size - k) // (out - 1) + 1
        assert first.min() >= 0 and first.max() <= 3, (k, out)


def test_bfloat16_non_integer_alpha_gradient_matches_torch():
    """bfloat16, alpha 38/26 and 34/17: output, indices and gradient equal PyTorch's."""
    rng = np.random.default_rng(15)
    x_cf = rng.integers(-4, 5, (3, 4, 40, 36)).astype(np.float32)
    u = rng.random((3, 4, 2)).astype(np.float32)
    g_cf = rng.integers(-8, 9, (3, 4, 27, 18)).astype(np.float32)
    tx = torch.tensor(x_cf).to(torch.bfloat16).requires_grad_()
    tu = torch.tensor(torch_samples(u)).to(torch.bfloat16)
    ty, ti = F.fractional_max_pool2d(tx, 2, (27, 18), _random_samples=tu, return_indices=True)
    (tg,) = torch.autograd.grad(ty, tx, torch.tensor(g_cf).to(torch.bfloat16))
    fn = jax_fractional((2, 2), (27, 18), "channels_first")
    y, i, g, gp = fn(*(jnp.asarray(a, jnp.bfloat16) for a in (x_cf, u, g_cf)))
    np.testing.assert_array_equal(i, ti.numpy())
    for got, want in ((y, ty), (g, tg), (gp, tg)):
        np.testing.assert_array_equal(np.float32(got), want.detach().to(torch.float32).numpy())


def test_bfloat16_gradient_on_a_long_axis_matches_torch():
    """bfloat16 samples whose starts leave the band (an axis of 1030): the gradient, picked in
    float32, still equals PyTorch's (the tangent gathers there)."""
    u_all = np.arange(2**16, dtype=np.uint16).view(jnp.bfloat16)
    u_all = u_all[(u_all.astype(np.float32) >= 0) & (u_all.astype(np.float32) < 1)]
    rel = np.asarray(torch_starts(jnp.asarray(u_all), 1030, 515, 2)) - (np.arange(515) - 1) * 2
    leaving = u_all[(rel.min(axis=1) < 0) | (rel.max(axis=1) > 4)]
    assert leaving.size
    rng = np.random.default_rng(13)
    x_cf = rng.integers(-4, 5, (1, 3, 1030, 4)).astype(np.float32)
    u = np.stack([rng.choice(leaving.astype(np.float32), 3), np.zeros(3)], -1)[None]
    g_cf = rng.integers(-8, 9, (1, 3, 515, 2)).astype(np.float32)
    tx = torch.tensor(x_cf).to(torch.bfloat16).requires_grad_()
    tu = torch.tensor(torch_samples(u)).to(torch.bfloat16)
    ty = F.fractional_max_pool2d(tx, 2, (515, 2), _random_samples=tu)
    (tg,) = torch.autograd.grad(ty, tx, torch.tensor(g_cf).to(torch.bfloat16))
    fn = jax_fractional((2, 2), (515, 2), "channels_first")
    y, _, g, gp = fn(*(jnp.asarray(a, jnp.bfloat16) for a in (x_cf, u, g_cf)))
    for got, want in ((y, ty), (g, tg), (gp, tg)):
        np.testing.assert_array_equal(np.float32(got), want.detach().to(torch.float32).numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_starts_before_the_last_strictly_increase(dtype):
    """The premise of the GPU tangent's unique-index gathers (checked at run time there too):
    with ``out + k - 1 <= in`` the starts before the last strictly increase, also for samples
    just below 1 and below ``1 - 2**-m``; the last start (``in - k``) may repeat the one before."""
    rng = np.random.default_rng(10)
    near = [dtype(1) - dtype(2.0) ** -m for m in range(1, 30)]
    near += [np.nextafter(v, dtype(0)) for v in near]
    u = np.concatenate([[0, 0.5], near, rng.random(300)]).astype(dtype)
    repeats = 0
    for size, k, out in [(7, 3, 5), (56, 3, 27), (100, 2, 99), (1000, 4, 997), (5000, 3, 1777)]:
        start = np.asarray(torch_starts(jnp.asarray(u), size, out, k))
        assert np.diff(start[:, :-1], axis=-1).min() >= 1, (size, k, out)
        repeats += int((start[:, -1] == start[:, -2]).sum())
    assert dtype is np.float64 or repeats > 0  # float32 samples near 1 do repeat the last


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_starts_round_every_operation(dtype):
    """PyTorch's 16-bit starts round ``i + u`` and each product to the sample dtype (numpy's
    16-bit arithmetic does the same), for every sample value in [0, 1)."""
    u = np.arange(2**16, dtype=np.uint16).view(np.dtype(dtype))
    u = u[(u.astype(np.float32) >= 0) & (u.astype(np.float32) < 1)]
    starts = jax.jit(torch_starts, static_argnums=(1, 2, 3))
    for size, k, out in [(56, 3, 27), (300, 2, 150), (4000, 2, 3999)]:
        alpha = _alpha(size, out, k, dtype)
        i = np.arange(out - 1).astype(dtype)
        want = ((i + u[:, None]) * alpha).astype(np.int32) - (u * alpha).astype(np.int32)[:, None]
        got = np.asarray(starts(jnp.asarray(u), size, out, k))
        np.testing.assert_array_equal(got[:, :-1], want)
        assert (got[:, -1] == size - k).all()


def test_band_rows_scatter_merged_or_along_the_axis_alike():
    """The non-integer band's rows go to their outputs in one scatter over the spatial axes
    merged, batched over the axes before them, or, where the row numbers would pass int32,
    along the axis alone: the same array, dropped rows included."""
    from jaxconv._src import fractional_plan

    t = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 7, 2)), jnp.float32)
    to = np.array([1, 9, 0, 4, 8, 2, 3])  # 9 and 8 are past the 5 outputs: dropped
    shape = (3, 4, 5, 2)
    along_axis = fractional_plan._axis_rows_to(t, to, shape, 2)
    np.testing.assert_array_equal(along_axis[:, :, 4], t[:, :, 3])
    np.testing.assert_array_equal(along_axis[:, :, 1], t[:, :, 0])
    for first in (0, 1, 2):
        got = fractional_plan._rows_to(t, to, shape, 2, first)
        np.testing.assert_array_equal(got, along_axis)

    def scatter_operand(v, first):
        program = jax.make_jaxpr(
            lambda v: fractional_plan._rows_to(v, to, (*v.shape[:2], 5, v.shape[3]), 2, first)
        )
        (scatter,) = [e for e in program(v).eqns if e.primitive.name == "scatter-add"]
        return scatter.invars[0].aval.shape

    assert scatter_operand(t, 1) == (3, 20, 2)  # the batch axis apart, the spatial ones merged
    huge = jax.ShapeDtypeStruct((1, 2**29, 7, 1), jnp.float32)
    assert scatter_operand(huge, 1) == (1, 2**29, 5, 1)  # not 2**29 * 5 merged rows


def test_band_offsets_wider_than_int16_keep_their_gradient():
    """An integer ``alpha`` of 32769 puts band offsets past int16: the gradient still goes to
    the chosen inputs (the sample moves a start off the grid, so the band's pick runs)."""
    size, u = 65540, np.float32(0.52323836)
    assert int(torch_starts(jnp.asarray([u]), size, 3, 2)[0, 1]) == 32770  # not 32769
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, size, 1)), jnp.float32)
    samples = jnp.full((1, 1, 1), u)

    def pool(x):
        return jaxconv.fractional_max_pool(
            x, (2,), output_size=3, samples=samples, return_indices=True
        )

    _, index = pool(x)
    grad = jax.grad(lambda x: jnp.sum(pool(x)[0]))(x)
    want = np.bincount(np.asarray(index).ravel(), minlength=size).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(grad).ravel(), want)

"""Graham's sequences of fractional_max_pool_graham against loop references, and both fractional
poolings under keys, jit, vmap and grad: second derivatives, the tangent's tap-by-tap and stacked
forms, bitwise reproducible gradients."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxconv
from jaxconv._src import select
from jaxconv._src.fractional import _spread_starts, torch_starts
from jaxconv._src.fractional_plan import FractionalPlan
from jaxconv._src.graham import graham_bounds, graham_windows


def test_key_determinism_jit_and_vmap():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 23, 19, 3)).astype(np.float32))

    def pool(key, v):
        return jaxconv.fractional_max_pool(
            v, (3, 2), output_size=(9, 8), key=key, return_indices=True
        )

    jitted = jax.jit(pool)
    a = jitted(jax.random.key(1), x)
    b = pool(jax.random.key(1), x)
    np.testing.assert_array_equal(a[1], b[1])
    others = [jitted(jax.random.key(k), x)[1] for k in range(2, 6)]
    assert any(not np.array_equal(a[1], o) for o in others)
    keys = jax.random.split(jax.random.key(7), 3)
    mapped = jax.vmap(jitted, in_axes=(0, None))(keys, x)
    for k in range(3):
        np.testing.assert_array_equal(mapped[1][k], pool(keys[k], x)[1])


def test_vmap_over_x_and_samples():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 2, 12, 10, 3)).astype(np.float32)  # two batch axes
    u = rng.random((4, 2, 3, 2)).astype(np.float32)
    fn = jax.jit(lambda v, s: jaxconv.fractional_max_pool(v, (2, 2), output_size=(6, 5), samples=s))
    mapped = jax.vmap(fn)(x, u)
    np.testing.assert_array_equal(mapped, fn(x, u))
    chex.assert_shape(mapped, (4, 2, 6, 5, 3))


@pytest.mark.parametrize("graham", [False, True])
def test_check_grads_float64(graham):
    rng = np.random.default_rng(5)
    x = rng.permutation(2 * 11 * 9).reshape(1, 11, 9, 2).astype(np.float64) / 7  # no ties
    if graham:
        fn = jax.jit(
            lambda v: jaxconv.fractional_max_pool_graham(
                v, output_size=(7, 5), key=jax.random.key(0), overlapping=True
            )
        )
    else:
        u = rng.random((1, 2, 2))
        fn = jax.jit(
            lambda v: jaxconv.fractional_max_pool(v, (2, 3), output_size=(6, 4), samples=u)
        )
    check_grads(fn, (x,), 1, ("fwd", "rev"))
    check_grads(fn, (x,), 2, ("rev",))


# Graham's sequences.


def reference_graham(x, bounds, overlapping):
    """Max, flat index (first max wins) and vjp of ones by loops over the regions, (H, W)."""
    h, w = x.shape
    bh, bw = (np.asarray(b) for b in bounds)
    rows = [(bh[i], min(bh[i + 1] + overlapping, h)) for i in range(len(bh) - 1)]
    cols = [(bw[j], min(bw[j + 1] + overlapping, w)) for j in range(len(bw) - 1)]
    y = np.empty((len(rows), len(cols)))
    idx = np.empty(y.shape, np.int64)
    grad = np.zeros_like(x)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            block = x[r0:r1, c0:c1]
            a, b = np.unravel_index(np.argmax(block), block.shape)
            y[i, j], idx[i, j] = block[a, b], (r0 + a) * w + c0 + b
            grad[r0 + a, c0 + b] += 1
    return y, idx, grad


@pytest.mark.parametrize("pseudo_random", [False, True])
@pytest.mark.parametrize("overlapping", [False, True])
def test_graham_pooling_matches_loop_reference(pseudo_random, overlapping):
    rng = np.random.default_rng(6)
    x = rng.integers(-5, 6, (17, 13)).astype(np.float64)  # ties: first maximum wins
    key = jax.random.key(3)
    kw = dict(key=key, pseudo_random=pseudo_random, overlapping=overlapping)

    def pool(v):
        return jaxconv.fractional_max_pool_graham(
            v, output_size=(7, 9), return_indices=True, data_format="channels_first", **kw
        )

    y, vjp, i = jax.vjp(jax.jit(pool), jnp.asarray(x[None]), has_aux=True)
    bounds = graham_bounds(key, (17, 13), (7, 9), pseudo_random)
    ry, ri, rg = reference_graham(x, bounds, overlapping)
    np.testing.assert_array_equal(y[0], ry)
    np.testing.assert_array_equal(i[0], ri)
    np.testing.assert_array_equal(vjp(jnp.ones_like(y))[0][0], rg)


BOUNDS = jax.jit(graham_bounds, static_argnums=(1, 2, 3))


@given(
    size=st.integers(1, 400),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
    pseudo_random=st.booleans(),
)
def test_graham_sequence_properties(size, frac, seed, pseudo_random):
    out = max(1, min(size, round(size * frac)))
    (bounds,) = BOUNDS(jax.random.key(seed), (size,), (out,), pseudo_random)
    bounds = np.asarray(bounds)
    steps = np.diff(bounds)
    assert bounds.shape == (out + 1,)
    assert bounds[0] == 0 and bounds[-1] == size
    assert set(steps.tolist()) <= {size // out, -(-size // out)}
    assert np.sum(steps == size // out + 1) == (size % out if size % out else 0)


def test_graham_keys():
    x = jnp.asarray(np.random.default_rng(8).standard_normal((1, 40, 40, 2)), jnp.float32)
    for pseudo in (False, True):
        fn = jax.jit(
            lambda k, p=pseudo: jaxconv.fractional_max_pool_graham(
                x, output_ratio=(0.7, 0.7), key=k, pseudo_random=p, return_indices=True
            )[1]
        )
        first = fn(jax.random.key(0))
        np.testing.assert_array_equal(first, fn(jax.random.key(0)))
        assert any(not np.array_equal(first, fn(jax.random.key(k))) for k in range(1, 5))
        chex.assert_shape(first, (1, 28, 28, 2))
        mapped = jax.vmap(fn)(jax.random.split(jax.random.key(1), 2))
        np.testing.assert_array_equal(mapped[0], fn(jax.random.split(jax.random.key(1), 2)[0]))


@pytest.mark.parametrize("overlapping", [False, True])
def test_graham_taps_before_the_last_name_distinct_inputs(overlapping):
    """Each tap of Graham's windows before the last (``start + min(j, length - 1)``) reads
    every input at most once (an overlapping last window is clipped and may repeat one)."""
    for seed, (size, out) in enumerate([(10, 7), (56, 27), (100, 33), (9, 9), (64, 5)]):
        for pseudo_random in (False, True):
            (bounds,) = graham_bounds(jax.random.key(seed), (size,), (out,), pseudo_random)
            start, length = graham_windows(bounds, size, overlapping)
            for j in range(int(length.max())):
                tap = np.asarray(start + jnp.minimum(j, length - 1))
                assert np.diff(tap[:-1]).min(initial=1) >= 1, (size, out, j)


def _torch_plan(u, axis, size, k, out):
    start = torch_starts(u[..., axis - 1], size, out, k)
    return FractionalPlan(axis, size, k, out), (_spread_starts(start, axis - 1, 2, True), None)


def _graham_plan(key, axis, size, out):
    (bounds,) = graham_bounds(key, (size,), (out,), False)
    aux = graham_windows(bounds, size, True)
    return FractionalPlan(axis, size, int(aux[1].max()), out), aux


@pytest.mark.parametrize("starts", ["torch", "torch repeating", "graham"])
def test_tap_by_tap_tangent_equals_the_stacked_one(starts):
    """GPUs pick the tangent tap by tap (unique-index gathers, collision-free transposes) where
    no start repeats before the last window, else from one stacked gather as the CPU does. Both
    forms and their transposes agree, with repeated last starts and with repeats before."""
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((2, 19, 17, 3)), jnp.float32)
    u = jnp.asarray(rng.random((2, 3, 2)), jnp.float32)
    u = u.at[0, 1].set(np.nextafter(np.float32(1), np.float32(0)))  # repeats the last start
    for axis, k, out in [(1, 3, 8), (2, 2, 11)]:
        size = x.shape[axis]
        if starts == "graham":
            plan, aux = _graham_plan(jax.random.key(axis), axis, size, out)
        else:
            plan, aux = _torch_plan(u, axis, size, k, out)
        if starts == "torch repeating":  # a start repeated mid-sequence: the stacked fallback
            aux = (jnp.take(aux[0], np.r_[0:3, 2, 4:out], axis=axis), None)
        assert bool(plan.distinct(aux, x.ndim)) == (starts != "torch repeating")
        out_shape = (*x.shape[:axis], out, *x.shape[axis + 1 :])
        offset = jnp.asarray(rng.integers(0, plan.kernel, out_shape), jnp.int8)
        forms = [
            functools.partial(f, aux=aux, offset=offset, plan=plan)
            for f in (select._pick_window_of, select._pick_distinct)
        ]
        if starts == "torch":  # non-integer alpha: the band of static slices too
            band = dataclasses.replace(plan, band=True)
            forms.append(lambda t, band=band, aux=aux, offset=offset: band.pick(t, aux, offset))
        for form in forms[1:]:
            np.testing.assert_array_equal(form(x), forms[0](x))
        ct = jnp.asarray(rng.integers(-4, 5, out_shape), jnp.float32)  # exact sums
        grads = [jax.linear_transpose(f, x)(ct)[0] for f in forms]
        for grad in grads[1:]:
            np.testing.assert_array_equal(grad, grads[0])


@pytest.mark.parametrize("graham", [False, True])
def test_gradient_is_bitwise_reproducible(graham):
    """Overlapping windows with a non-integer alpha: two compilations, the same gradient bits
    (on GPUs the tangent's transposes are scatters without collisions)."""
    x = jax.random.normal(jax.random.key(3), (4, 31, 29, 8))
    g = jax.random.normal(jax.random.key(4), (4, 12, 11, 8))

    def pool(x):
        if graham:
            return jaxconv.fractional_max_pool_graham(
                x, output_size=(12, 11), key=jax.random.key(5), overlapping=True
            )
        return jaxconv.fractional_max_pool(x, (3, 3), output_size=(12, 11), key=jax.random.key(5))

    def grad_fn():
        return jax.jit(lambda x: jax.vjp(pool, x)[1](g)[0])

    a, b = grad_fn()(x), grad_fn()(x)
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("out", [5, 4], ids=["non-integer-alpha", "integer-alpha"])
def test_grad_of_vmap_over_samples_equals_vmap_of_grad(out):
    """Per-member samples under ``vmap`` inside ``grad``: the input shared by every member
    (its gradient sums theirs) and batched with it. The non-integer alpha (9 -> 5) picks the
    tangent from the band, the integer one (8 -> 4) may run the regular pool."""
    rng = np.random.default_rng(7)
    size = 9 if out == 5 else 8
    x = jnp.asarray(rng.standard_normal((3, size, size, 2)))
    u = jnp.asarray(rng.random((3, 1, 2, 2)))

    def loss(a, s):
        y = jaxconv.fractional_max_pool(a[None], (2, 2), output_size=(out, out), samples=s)
        return jnp.sum(jnp.sin(y))

    per_member = jax.vmap(jax.grad(loss))(x, u)
    batched = jax.grad(lambda a: jnp.sum(jax.vmap(loss)(a, u)))(x)
    np.testing.assert_array_equal(batched, per_member)
    shared = jax.grad(lambda a: jnp.sum(jax.vmap(loss, (None, 0))(a, u)))(x[0])
    per_sample = jax.vmap(jax.grad(loss), (None, 0))(x[0], u)
    np.testing.assert_allclose(shared, jnp.sum(per_sample, 0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("graham", [False, True], ids=["torch", "graham"])
def test_grad_of_vmap_over_keys(graham):
    """The common training step: a model ``vmap``-ed over examples with a key each."""
    x = jnp.asarray(np.random.default_rng(8).standard_normal((4, 11, 11, 3)))
    keys = jax.random.split(jax.random.key(3), 4)

    def loss(a, k):
        if graham:
            y = jaxconv.fractional_max_pool_graham(a[None], output_ratio=(0.7, 0.7), key=k)
        else:
            y = jaxconv.fractional_max_pool(a[None], (2, 2), output_ratio=0.7, key=k)
        return jnp.sum(y**2)

    got = jax.jit(jax.grad(lambda a: jnp.sum(jax.vmap(loss)(a, keys))))(x)
    np.testing.assert_array_equal(got, jax.vmap(jax.grad(loss))(x, keys))
    assert jnp.count_nonzero(got) > 0
    nested = jax.grad(lambda a: jnp.sum(jax.vmap(jax.vmap(loss))(a, keys.reshape(2, 2))))
    np.testing.assert_array_equal(nested(x.reshape(2, 2, 11, 11, 3)), got.reshape(2, 2, 11, 11, 3))

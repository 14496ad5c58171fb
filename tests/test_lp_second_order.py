"""lp_pool's second derivatives: order-2 checks, Hessians at zero windows, at tied maxima and
at an infinite p, in x and in p."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxconv


def test_second_derivatives_are_finite_at_all_zero_windows():
    """Zero windows (common after a ReLU): grad of grad and the Hessian in p stay finite and
    equal the derivatives without those windows."""
    x = jnp.array([1.0, 2.0, 0.0, 0.0]).reshape(1, 4, 1)

    def penalty(s, x):
        return jnp.sum(jax.grad(lambda v: jnp.sum(jaxconv.lp_pool(v * s, 2.0, (2,))))(x) ** 2)

    # the gradient of a norm is scale-free, so penalty(s) = s**2 * penalty(1)
    np.testing.assert_allclose(jax.grad(penalty)(1.0, x), 2 * penalty(1.0, x), rtol=1e-6)
    hessian_p = jax.hessian(lambda p, x: jnp.sum(jaxconv.lp_pool(x, p, (2,))))
    np.testing.assert_allclose(hessian_p(2.0, x), hessian_p(2.0, x[:, :2]), rtol=1e-6)


@pytest.mark.parametrize(("window", "padding"), [((2,), 1), ((5, 6), (2, 3))])
def test_check_grads_order_2_for_p_between_1_and_2(window, padding):
    """(|x|/y)^(p-1) has an infinite derivative at 0 for p < 2: the zero fill and padding of
    the gradient's windows must not turn second derivatives into NaN."""
    shape = (1, 3, 1) if len(window) == 1 else (1, 8, 9, 1)
    x = jnp.asarray(np.random.default_rng(10).uniform(0.5, 1.5, shape))
    check_grads(
        jax.jit(lambda x: jaxconv.lp_pool(x, 1.5, window, 1, padding)), (x,), 2, modes=["rev"]
    )
    f = jax.jit(lambda x, p: jaxconv.lp_pool(x, p, window, 1, padding))
    check_grads(f, (x, jnp.float64(1.3)), 2, modes=["rev"])


@pytest.mark.parametrize("p", ["traced", 1e39])
def test_second_derivatives_at_an_infinite_p_equal_the_static_inf(p):
    """A traced ``p = inf``, or a static ``p`` beyond float32's range, takes the log form,
    whose exponents multiply by ``p``: the Hessian and grad of grad stay finite and equal
    the static ``p = inf``'s (max pooling of ``|x|``: 0 for the norm, 2 on the diagonal of
    its square at the maxima)."""
    x = jnp.array([-0.37, 0.99, 0.42, -0.62]).reshape(1, 4, 1)

    def loss(v, q):
        return jnp.sum(jaxconv.lp_pool(v, q, (2,)) ** 2)

    q = jnp.float32(np.inf) if p == "traced" else p
    expected = jax.hessian(loss)(x, float("inf")).reshape(4, 4)
    np.testing.assert_array_equal(jax.hessian(loss)(x, q).reshape(4, 4), expected)
    np.testing.assert_array_equal(np.diag(expected), [0, 2, 0, 2])
    twice = jax.grad(lambda v: jnp.sum(jax.grad(loss)(v, q)))(x)
    np.testing.assert_array_equal(twice.ravel(), [0, 2, 0, 2])


def _norm_hessian(v, p):
    """The Hessian of ``||v||_p`` (float64): ``(p-1)/y * (diag(|q|^(p-2)) - u u^T)`` with
    ``q = v/y`` and ``u = sign(q) |q|^(p-1)``."""
    y = np.sum(np.abs(v) ** p) ** (1 / p)
    q = np.abs(v) / y
    u = np.sign(v) * q ** (p - 1)
    return (p - 1) / y * (np.diag(q ** (p - 2)) - np.outer(u, u))


@pytest.mark.parametrize("p", [2.0, 3.0, 2000.0])
@pytest.mark.parametrize("traced", [False, True], ids=["static", "traced"])
@pytest.mark.parametrize("window", [(2, 2), (6, 6)], ids=["box", "per-axis"])
def test_hessian_where_elements_tie_for_the_window_maximum(window, traced, p):
    """Ties for the largest ``|x|`` share the maximum's tangent in the log form (a traced
    ``p``, a static one of 1024 and more): the Hessian is still the norm's, in one box and
    one axis at a time (windows over 27 elements)."""
    rng = np.random.default_rng(13)
    v = rng.uniform(0.3, 0.9, window) * rng.choice([-1.0, 1.0], window)
    v.flat[rng.choice(v.size, 3, replace=False)] = [1.0, -1.0, 1.0]  # three tied maxima
    x = jnp.asarray(v.reshape(1, *window, 1))
    q = jnp.float64(p) if traced else p

    def norm(x):
        return jnp.sum(jaxconv.lp_pool(x, q, window))

    n = v.size
    hess = np.asarray(jax.jit(jax.hessian(norm))(x)).reshape(n, n)
    np.testing.assert_allclose(hess, _norm_hessian(v.ravel(), p), rtol=1e-9, atol=1e-9)
    twice = np.asarray(jax.jit(jax.jacrev(jax.grad(norm)))(x)).reshape(n, n)
    np.testing.assert_allclose(twice, hess, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("values", [(2.0, 1.0), (3.0, 1.0, 1.5), (4.0, 2.0, -2.0, 1.0)], ids=str)
def test_traced_p_hessian_where_an_element_is_half_the_maximum(values):
    """The log form switches formulas at ``|x| = max/2``; its Hessian there is the norm's
    (it was halved: a clamp split its derivative at that point)."""
    v = np.asarray(values)
    x = jnp.asarray(v.reshape(1, -1, 1))

    def norm(x, p):
        return jnp.sum(jaxconv.lp_pool(x, p, (v.size,)))

    n = v.size
    for p in (3.0, 7.0):
        hess = np.asarray(jax.jit(jax.hessian(norm))(x, jnp.float64(p))).reshape(n, n)
        np.testing.assert_allclose(hess, _norm_hessian(v, p), rtol=1e-9, atol=1e-12)


def test_traced_p_inf_shares_the_gradient_among_tied_maxima():
    """``1/ties`` at each tied maximum of ``|x|``: the limit of the finite-p gradient."""
    x = jnp.array([[-3.0, 3.0], [1.0, -3.0]]).reshape(1, 2, 2, 1)

    def grad(p):
        return jax.grad(lambda x: jnp.sum(jaxconv.lp_pool(x, p, (2, 2))))(x)[0, ..., 0]

    np.testing.assert_allclose(grad(jnp.float32(np.inf)), [[-1 / 3, 1 / 3], [0, -1 / 3]])
    np.testing.assert_allclose(grad(jnp.float32(1e9)), grad(jnp.float32(np.inf)), rtol=1e-6)


def test_hessian_is_forward_over_reverse_and_equals_reverse_over_reverse():
    x = jnp.asarray(np.random.default_rng(12).uniform(0.5, 2.0, (1, 4, 5, 2)), jnp.float64)

    def loss(x):
        return jnp.sum(jnp.sin(jaxconv.lp_pool(x, 3.0, (2, 3), 1, 1)))

    h = jax.jit(jax.hessian(loss))(x)
    np.testing.assert_allclose(h, jax.jit(jax.jacrev(jax.jacrev(loss)))(x), rtol=1e-10)
    assert np.isfinite(np.asarray(h)).all()

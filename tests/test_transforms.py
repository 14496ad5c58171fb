"""Every op under the JAX transformations its docstring claims.

jit (identical to eager), vmap over the batch axis and over extra leading axes (identical to the
op's own ``*batch`` support), grad under jit (equal to the eager VJP), jvp where claimed (checked
against the VJP: ``<J t, c> == <t, J^T c>``), hessian where claimed (symmetric, equal to
reverse-over-reverse), ``jax.checkpoint``, ``jax.eval_shape``, and no recompilation on a second
call with the same shapes.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv

B, H, W, C = 2, 6, 5, 3


def op(name):
    fn = getattr(jaxconv, name, None)
    if fn is None:
        pytest.skip(f"jaxconv.{name} is not available")
    return fn


@dataclasses.dataclass(frozen=True)
class Spec:
    """``fn(x, aux)``: jaxconv.``op`` on channels_last ``x`` of shape ``(*batch, H, W, C)``;
    ``aux(x)`` builds per-example extra arrays (indices, samples) with the same leading axes."""

    op: str
    fn: Callable
    aux: Callable = lambda x: None

    @property
    def forward_mode(self) -> bool:
        """Whether the op's docstring claims jvp (else it says forward mode raises)."""
        doc = " ".join(op(self.op).__doc__.split())
        return "jvp" in doc and "Not forward mode" not in doc


def _indices(x):
    """Indices of a 2x2 max pooling whose output has ``x``'s shape (for max_unpool)."""
    shape = (*x.shape[:-3], 2 * x.shape[-3], 2 * x.shape[-2], x.shape[-1])
    source = jnp.cos(jnp.arange(math.prod(shape), dtype=x.dtype) * 1.3).reshape(shape)
    return op("max_pool")(source, (2, 2), return_indices=True)[1]


def _samples(x):
    count = math.prod(x.shape[:-3]) * x.shape[-1] * 2
    return jnp.linspace(0.05, 0.95, count, dtype=x.dtype).reshape((*x.shape[:-3], x.shape[-1], 2))


def _w(x, cin, cout=None):
    """A fixed 2x2 HWIO kernel; ``cout`` defaults to ``x``'s channels (conv_transpose)."""
    cout = x.shape[-1] if cout is None else cout
    return jnp.cos(jnp.arange(2 * 2 * cin * cout, dtype=x.dtype)).reshape((2, 2, cin, cout))


SPECS = {
    "conv": Spec(
        "conv", lambda x, a: op("conv")(x, _w(x, x.shape[-1], 4), stride=(1, 2), padding="SAME")
    ),
    "conv_transpose": Spec(
        "conv_transpose",
        lambda x, a: op("conv_transpose")(x, _w(x, 2), stride=2, padding=((0, 1), (1, 0))),
    ),
    "max_pool": Spec(
        "max_pool", lambda x, a: op("max_pool")(x, (3, 2), 2, 1, dilation=(1, 2), ceil_mode=True)
    ),
    "avg_pool": Spec(
        "avg_pool",
        lambda x, a: op("avg_pool")(x, (3, 3), 2, 1, ceil_mode=True, count_include_pad=False),
    ),
    "lp_pool": Spec("lp_pool", lambda x, a: op("lp_pool")(x, 3.0, (2, 3), 1, 1)),
    "lp_pool_traced_p": Spec(
        "lp_pool", lambda x, a: op("lp_pool")(x, jnp.asarray(2.5, x.dtype), (2, 2))
    ),
    "max_unpool": Spec("max_unpool", lambda x, a: op("max_unpool")(x, a, (2, 2)), aux=_indices),
    "adaptive_avg_pool": Spec("adaptive_avg_pool", lambda x, a: op("adaptive_avg_pool")(x, (4, 2))),
    "adaptive_max_pool": Spec(
        "adaptive_max_pool", lambda x, a: op("adaptive_max_pool")(x, (3, None))
    ),
    "fractional_max_pool": Spec(
        "fractional_max_pool",
        lambda x, a: op("fractional_max_pool")(x, (2, 2), output_size=(4, 3), samples=a),
        aux=_samples,
    ),
    "fractional_max_pool_graham": Spec(
        "fractional_max_pool_graham",
        lambda x, a: op("fractional_max_pool_graham")(
            x, output_ratio=(0.7, 0.6), key=jax.random.key(0), overlapping=True
        ),
    ),
}
NAMES = list(SPECS)


def _x(shape=(B, H, W, C), dtype=jnp.float64, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _f(name):
    spec = SPECS[name]
    return lambda x: spec.fn(x, spec.aux(x))


def _cot(y):
    return jnp.cos(jnp.arange(y.size, dtype=y.dtype) * 0.7).reshape(y.shape)


@pytest.mark.parametrize("name", NAMES)
def test_jit_identical_to_eager(name):
    """Bit-identical, except Lp pooling: XLA fuses its powers and roots differently from the
    op-by-op eager run (a few float32 ulps)."""
    x = _x(dtype=jnp.float32)
    f = _f(name)
    got, want = np.asarray(jax.jit(f)(x)), np.asarray(f(x))
    if name.startswith("lp_pool"):
        np.testing.assert_allclose(got, want, rtol=4 * np.finfo(np.float32).eps)
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_batch_and_extra_leading_axes(name):
    spec = SPECS[name]
    x = _x((3, B, H, W, C))
    aux = spec.aux(x)
    direct = jax.jit(spec.fn)(x, aux)  # the op's own *batch support
    mapped = jax.jit(jax.vmap(spec.fn))(x, aux)  # batch (B,) inside
    nested = jax.jit(jax.vmap(jax.vmap(spec.fn)))(x, aux)  # no batch axis inside
    flat_aux = None if aux is None else aux.reshape((3 * B, *aux.shape[2:]))
    flat = jax.jit(spec.fn)(x.reshape((3 * B, H, W, C)), flat_aux)
    np.testing.assert_allclose(mapped, direct, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(nested, direct, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(flat.reshape(direct.shape), direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_grad_and_checkpoint_under_jit(name):
    """``<grad, t>`` equals the central difference of the same jitted function along ``t``
    (float64; random inputs have no ties, so the max ops are differentiable there), and the
    gradient through ``jax.checkpoint`` is the same."""
    f, x, t = _f(name), _x(), _x(seed=1)
    jf = jax.jit(f)
    cot = _cot(jf(x))
    both = jax.jit(
        lambda x: (
            jax.grad(lambda x: jnp.sum(f(x) * cot))(x),
            jax.grad(lambda x: jnp.sum(jax.checkpoint(f)(x) * cot))(x),
        )
    )
    grad, remat = both(x)
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(remat, grad, rtol=1e-12, atol=1e-12)
    eps = 1e-6
    fd = jnp.vdot(jf(x + eps * t) - jf(x - eps * t), cot) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(grad, t), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_jvp_where_claimed(name):
    """Forward mode agrees with reverse mode: ``<J t, c> == <t, J^T c>``; or raises if not
    claimed."""
    f, x = _f(name), _x()
    t = _x(seed=1)
    if not SPECS[name].forward_mode:
        with pytest.raises(TypeError, match="forward-mode"):
            jax.jvp(f, (x,), (t,))
        return
    y, jt = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, t)
    cot = _cot(y)
    (jtc,) = jax.jit(lambda x, c: jax.vjp(f, x)[1](c))(x, cot)
    np.testing.assert_allclose(jnp.vdot(jt, cot), jnp.vdot(t, jtc), rtol=1e-10)
    np.testing.assert_allclose(y, f(x), rtol=1e-12)


LINEAR = {
    "conv": _f("conv"),
    "conv_transpose": _f("conv_transpose"),
    "max_unpool": _f("max_unpool"),
    "avg_pool": _f("avg_pool"),
    "adaptive_avg_pool 6->3": lambda x: op("adaptive_avg_pool")(x, (3, None)),
    # windows of varying lengths, and global windows: the forward pass's overflow rescue is a
    # value-dependent lax.cond, which the transpose never meets
    "adaptive_avg_pool 6->4": lambda x: op("adaptive_avg_pool")(x, (4, None)),
    "adaptive_avg_pool 6x5->1x1": lambda x: op("adaptive_avg_pool")(x, (1, 1)),
}


@pytest.mark.parametrize("name", list(LINEAR))
def test_linear_transpose_equals_the_vjp(name):
    """Every linear op transposes under ``jax.linear_transpose`` (README, Derivative rules)."""
    f, x = LINEAR[name], _x()
    cot = _cot(f(x))
    (ft,) = jax.linear_transpose(f, jax.ShapeDtypeStruct(x.shape, x.dtype))(cot)
    np.testing.assert_allclose(ft, jax.vjp(f, x)[1](cot)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_second_order(name):
    """Reverse-over-reverse always (symmetric); ``jax.hessian`` (forward-over-reverse), equal
    to it, where the docstring claims forward mode."""
    spec = SPECS[name]
    x = _x((1, 5, 4, 2), seed=2)
    aux = spec.aux(x)

    def loss(x):
        y = spec.fn(x, aux)
        return jnp.sum(jnp.sin(y) * _cot(y))

    rr = jax.jit(jax.jacrev(jax.jacrev(loss)))(x)
    n = x.size
    assert np.isfinite(np.asarray(rr)).all()
    np.testing.assert_allclose(rr.reshape(n, n), rr.reshape(n, n).T, atol=1e-10)
    if spec.forward_mode:
        hess = jax.jit(jax.hessian(loss))(x)
        np.testing.assert_allclose(hess, rr, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_eval_shape(name):
    """The abstract result is the real one's; every dtype is kept."""
    f, x = _f(name), _x(dtype=jnp.float32)
    y = jax.jit(f)(x)
    for dtype in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64):
        shape = jax.eval_shape(f, x.astype(dtype))
        assert (shape.shape, shape.dtype) == (y.shape, dtype)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("max_pool", {"window": (2, 2), "return_indices": True}),
        ("adaptive_max_pool", {"output_size": (3, 2), "return_indices": True}),
        ("fractional_max_pool", {"window": (2, 2), "output_size": (3, 3), "return_indices": True}),
    ],
)
def test_indices_under_eval_shape_and_vmap(name, kwargs):
    x = _x()
    extra = {"samples": _samples(x)} if name == "fractional_max_pool" else {}

    def f(x, **extra):
        return op(name)(x, **kwargs, **extra)

    values, idx = jax.jit(f)(x, **extra)
    shapes = jax.eval_shape(f, x, **extra)
    assert shapes[0].shape == values.shape == idx.shape == shapes[1].shape
    assert jnp.issubdtype(idx.dtype, jnp.integer)
    mapped = jax.vmap(f)(x, **extra)
    np.testing.assert_array_equal(mapped[1], idx)
    np.testing.assert_array_equal(mapped[0], values)


@pytest.mark.parametrize("name", NAMES)
def test_no_recompilation_on_second_call(name):
    traces = []
    f = _f(name)

    def g(x):
        traces.append(1)
        return f(x)

    jitted = jax.jit(g)
    x = _x(dtype=jnp.float32)
    jax.block_until_ready(jitted(x))
    jax.block_until_ready(jitted(x * 2 + 1))  # new values, same shapes
    assert len(traces) == 1
    assert jitted._cache_size() == 1

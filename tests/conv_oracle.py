"""A convolution's forward and vjp in either data format against a PyTorch float64 reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

CL, CF = "channels_last", "channels_first"
# (dtype, tolerance relative to the largest magnitude) of a convolution's output and gradients
TOLERANCES = [(np.float64, 1e-12), (jnp.float16, 3e-3), (jnp.bfloat16, 2e-2)]


def to_format(a, data_format, weight=False):
    """NCHW / OIHW arrays in ``data_format`` (weights: OIHW -> HWIO for channels_last)."""
    if data_format == CF:
        return jnp.asarray(a)
    return jnp.asarray(np.moveaxis(a, (0, 1), (-1, -2)) if weight else np.moveaxis(a, 1, -1))


def from_format(a, data_format, weight=False):
    a = np.asarray(a)
    if data_format == CF:
        return a
    return np.moveaxis(a, (-1, -2), (0, 1)) if weight else np.moveaxis(a, -1, 1)


def formatted(inputs, data_format):
    """NCHW ``x``, OIHW ``w`` and ``b`` as ``data_format`` arrays."""
    x, w, b = inputs
    return to_format(x, data_format), to_format(w, data_format, True), jnp.asarray(b)


def check_vjp(f, inputs, reference, *, data_format, dtype, tol, rng):
    """``f(x, w, b)`` and its vjp for a random cotangent against ``reference(g)``, which returns
    PyTorch's output and gradients of x, w and b for the NCHW cotangent ``g``.

    ``inputs``: NCHW/OIHW float64 ``x``, ``w`` and ``b``, exactly representable in ``dtype``.
    """
    y, pullback = jax.vjp(f, *(a.astype(dtype) for a in formatted(inputs, data_format)))
    chex.assert_type(y, dtype)
    shape = from_format(y, data_format).shape
    g = np.asarray(jnp.asarray(rng.uniform(-1, 1, shape), dtype), np.float64)
    want = reference(g)
    dx, dw, db = pullback(to_format(g, data_format).astype(dtype))
    got = (
        from_format(y, data_format),
        from_format(dx, data_format),
        from_format(dw, data_format, True),
        db,
    )
    for name, a, e in zip(("y", "dx", "dw", "db"), got, want, strict=True):
        chex.assert_shape(a, e.shape)
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(np.asarray(a, np.float64), e, atol=tol * scale, err_msg=name)

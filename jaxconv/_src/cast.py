"""bfloat16 <-> float32 conversions for ops that compute 16-bit input in float32.

XLA's CPU code rounds float32 to bfloat16 with a slow instruction sequence; the same
round-to-nearest-even on the bit patterns (add ``0x7FFF`` plus the lowest kept bit, shift) runs
at the speed of a copy, and subnormal results are rounded, not flushed. Whether XLA fuses the
producer of ``y`` into the rounding loop depends on how the rounding reads ``y``: testing NaN on
the bits (``fuse=True``) reads it once and XLA fuses; testing it as a float reads it twice and
XLA writes ``y`` first. Fusing a result assembled from border blocks (``dynamic_update_slice``)
makes every element select among the blocks, so which one is faster is measured per use
(:mod:`jaxconv._src.avg`).

:func:`widen` and :func:`narrow` are ``jax.custom_vjp``s whose rules are each other, so
reverse mode at any order converts cotangents the same way. Forward mode is not supported, so
they serve where JAX does not differentiate the result: the primal of a ``jax.custom_jvp``
(depthwise convolution) or the lowering of a primitive with rules of its own (avg pooling).
:func:`round_to` rounds as :func:`narrow` with ``astype`` as its tangent, for every mode (Lp
pooling, whose Hessian is forward over reverse).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# XLA's CPU compiler (jax 0.10.2) moves an elementwise map of a 16-bit array (a conversion to
# float32, the int16 order keys) ahead of the slices that read it and writes the mapped array
# out first when one loop reads 16 or more slices of it; up to 15 it maps each slice inside the
# loop. Ops that read many taps of 16-bit input therefore map them in groups (tap_groups).
CONVERTED_TAPS = 15


def tap_groups(count: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges splitting ``count`` taps into near-equal groups of at most
    ``CONVERTED_TAPS``, each mapped from 16 bits inside one loop."""
    groups = -(-count // CONVERTED_TAPS)
    bounds = np.linspace(0, count, groups + 1).round().astype(int).tolist()
    return list(itertools.pairwise(bounds))


def _round_bits(y: jax.Array, fuse: bool) -> jax.Array:
    """float32 to bfloat16, round to nearest even, as ``astype``."""
    bits = lax.bitcast_convert_type(y, jnp.uint32)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000 if fuse else jnp.isnan(y)
    rounded = jnp.where(nan, (bits >> 16) | 0x40, rounded)  # quiet, sign and payload kept
    return lax.bitcast_convert_type(rounded.astype(jnp.uint16), jnp.bfloat16)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _to_bfloat16(y, fuse: bool):
    return _round_bits(y, fuse)


def _to_bfloat16_fwd(y, fuse):
    return _round_bits(y, fuse), None


def _to_bfloat16_bwd(_fuse, _, g):
    return (_to_float32(g),)


@jax.custom_vjp
def _to_float32(x):
    return x.astype(jnp.float32)


def _to_float32_fwd(x):
    return x.astype(jnp.float32), None


def _to_float32_bwd(_, g):
    return (_to_bfloat16(g, True),)


_to_bfloat16.defvjp(_to_bfloat16_fwd, _to_bfloat16_bwd)
_to_float32.defvjp(_to_float32_fwd, _to_float32_bwd)


def widen(x: jax.Array) -> jax.Array:
    """``x`` in float32 if it has fewer bits, else as it is."""
    if x.dtype == jnp.bfloat16:
        return _to_float32(x)
    return x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def round_to(y: jax.Array, dtype, fuse: bool = True) -> jax.Array:
    """``y.astype(dtype)``, with float32 to bfloat16 rounded on the bit patterns. A
    ``jax.custom_jvp`` whose tangent is ``astype``, so every mode of differentiation works (for
    ops that are not ``custom_vjp``s themselves)."""
    return narrow(y, dtype, fuse)


@round_to.defjvp
def _round_to_jvp(dtype, fuse, primals, tangents):
    return round_to(primals[0], dtype, fuse), tangents[0].astype(dtype)


def narrow(y: jax.Array, dtype, fuse: bool = True) -> jax.Array:
    """``y`` rounded to ``dtype`` (round to nearest even, as ``astype``); ``fuse`` as above."""
    if dtype == jnp.bfloat16 and y.dtype == jnp.float32:
        return _to_bfloat16(y, fuse)
    return y.astype(dtype)

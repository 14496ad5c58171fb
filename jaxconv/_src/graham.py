"""Fractional max pooling with Graham's ratio-based regions (``tf.nn.fractional_max_pool``).

Graham's sequences (Graham 2014) are cumulative boundaries ``0 = a[0] < a[1] < ... < a[out] =
in`` whose increments are ``floor(in/out)`` or ``ceil(in/out)``: a random permutation of those
increments ("random"), or ``a[i] = ceil(alpha*(i + u)) - 1`` with ``alpha = in/out`` and one
``u`` ("pseudo-random"). Window ``i`` is ``[a[i], a[i+1])``, or ``[a[i], min(a[i+1], in - 1)]``
when overlapping. One sequence per axis is shared by the batch and the channels; the pooling
itself is :mod:`jaxconv._src.fractional`'s (variable-length windows of a ``FractionalPlan``).
"""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxconv._src.args import check_bool, check_floating, check_index_volume, spatial_rank
from jaxconv._src.fractional import (
    check_fits,
    check_key,
    check_one_size,
    layout_sizes,
    output_sizes,
    pool,
)
from jaxconv._src.fractional_plan import FractionalPlan


def graham_random_boundaries(key: jax.Array, size: int, out: int) -> jax.Array:
    """``out + 1`` boundaries from ``0`` to ``size``: a random order of the increments."""
    k, extra = divmod(size, out)
    steps = jnp.where(jnp.arange(out) < extra, k + 1, k).astype(jnp.int32)
    steps = jax.random.permutation(key, steps)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(steps, dtype=jnp.int32)])


def _pseudo_random_grid(size: int, out: int) -> tuple[int, int]:
    """``u = m / (size*q)`` with an integer ``m`` in ``[1, q*top]``: ``(q, top)``.

    ``top / size`` is Graham's largest admissible ``u`` (``min((k+2)/alpha - 1,
    (size+1-k)/alpha - (out-1))`` with ``k = size // out``, both multiples of ``1/size``), so
    every increment lies in ``{k, k+1}``; ``q`` refines the grid as far as int32 allows.
    """
    k = size // out
    top = min((k + 2) * out - size, size + out - k * out)
    q = (2**30) // (size * out + top)
    if q < 1:
        raise ValueError(
            f"fractional_max_pool_graham: the pseudo-random sequence needs in*out below 2**30, "
            f"got output_size {out} for the input size {size}."
        )
    return q, top


def graham_pseudo_random_boundaries(key: jax.Array, size: int, out: int) -> jax.Array:
    """``out + 1`` boundaries ``a[i] = ceil(alpha*(i + u)) - 1``, ``a[0] = 0``, ``a[out] = size``.

    Exact integer arithmetic: with ``u = m / (size*q)``, ``ceil(alpha*(i + u)) - 1 =
    floor((size*q*i + m - 1) / (out*q))``.
    """
    q, top = _pseudo_random_grid(size, out)
    m = jax.random.randint(key, (), 1, q * top + 1, dtype=jnp.int32)
    i = jnp.arange(1, out, dtype=jnp.int32)
    inner = (size * q * i + m - 1) // (out * q)
    ends = jnp.array([0], jnp.int32), jnp.array([size], jnp.int32)
    return jnp.concatenate([ends[0], inner, ends[1]])


def graham_windows(bounds: jax.Array, size: int, overlapping: bool):
    """Window starts and lengths from the boundaries (overlapping: the right one included)."""
    start = bounds[:-1]
    stop = jnp.minimum(bounds[1:] + 1, size) if overlapping else bounds[1:]
    return start, stop - start


def graham_kernel(size: int, out: int, overlapping: bool) -> int:
    """The longest window: ``floor(in/out)``, plus one if it does not divide, plus overlap."""
    return size // out + int(size % out != 0) + int(overlapping)


def graham_bounds(key, sizes, outs, pseudo_random: bool) -> list[jax.Array]:
    """Graham's boundaries ``a[0..out]`` per spatial axis, one key per axis split from ``key``."""
    make = graham_pseudo_random_boundaries if pseudo_random else graham_random_boundaries
    keys = jax.random.split(key, len(sizes))
    return [make(keys[i], s, o) for i, (s, o) in enumerate(zip(sizes, outs, strict=True))]


def fractional_max_pool_graham(
    x: ArrayLike,
    *,
    output_size=None,
    output_ratio=None,
    key: ArrayLike,
    pseudo_random: bool = False,
    overlapping: bool = False,
    return_indices: bool = False,
    data_format: str = "channels_last",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Fractional max pooling with Graham's ratio-based regions (``tf.nn.fractional_max_pool``).

    Along each spatial axis of input length ``in`` and output length ``out`` (``1 <= out <=
    in``), the pooling regions are cut by boundaries ``0 = a[0] < a[1] < ... < a[out] = in``
    whose increments are all ``floor(in/out)`` or ``ceil(in/out)`` (Graham, "Fractional
    Max-Pooling", 2014). One sequence per axis is drawn from ``key`` and shared by every batch
    element and channel:

    - ``pseudo_random=False`` ("random"): a uniformly random order of the ``in % out`` long and
      ``out - in % out`` short increments.
    - ``pseudo_random=True``: ``a[i] = ceil(alpha * (i + u)) - 1`` with ``alpha = in / out`` and
      one random ``u`` in ``(0, u_max]``, where ``u_max`` keeps every increment in
      ``{floor(alpha), ceil(alpha)}``; computed in exact int32 arithmetic (``u`` on a fine
      rational grid), which needs ``in * out`` below ``2**30`` on every axis (a ValueError
      otherwise).

    Region ``i`` is ``[a[i], a[i+1])`` (disjoint) or, with ``overlapping=True``, ``[a[i],
    a[i+1]]`` (the right boundary element is shared with the next region; the last region stops
    at ``in - 1``). Ties and NaN follow PyTorch's max pooling (first maximum wins, NaN
    propagates). The sequences are TensorFlow's rules, not its random stream.

    Args:
      x: ``(*batch, *spatial, C)`` for channels_last or ``(*batch, C, *spatial)`` for
        channels_first, a floating dtype.
      output_size: a sequence of ``n`` ints (``n`` spatial axes); exactly one of this and
        ``output_ratio``.
      output_ratio: a sequence of ``n`` floats in (0, 1), ``out = int(in * ratio)``
        (TensorFlow's ``pooling_ratio`` is ``1 / ratio``).
      key: a PRNG key; the same key gives the same regions.
      pseudo_random: the pseudo-random sequence instead of the random one.
      overlapping: regions share their boundary elements.
      return_indices: also return the flat index of every maximum.
      data_format: "channels_last" or "channels_first".

    Returns:
      The pooled array (dtype ``x.dtype``) and, with ``return_indices``, the int32 flat index
      of each maximum in the spatial volume of its (batch, channel).

    Transformations: ``jit``, ``vmap`` (over ``x`` or ``key``), ``grad``/``vjp``, ``jvp`` and
    higher orders in ``x``; the cotangent goes to the selected maximum only. Reverse mode
    transposes gathers into scatter-adds, bitwise reproducible on every backend (on GPUs one
    per window tap, each of unique indices).

    Example:
      >>> x = jnp.arange(36.0).reshape(1, 6, 6, 1)
      >>> fractional_max_pool_graham(x, output_size=(4, 4), key=jax.random.key(0)).shape
      (1, 4, 4, 1)
    """
    fname = "fractional_max_pool_graham"
    x = check_floating(fname, "x", x)
    return_indices = check_bool(fname, "return_indices", return_indices)
    pseudo_random = check_bool(fname, "pseudo_random", pseudo_random)
    overlapping = check_bool(fname, "overlapping", overlapping)
    check_one_size(fname, output_size, output_ratio)
    given = output_size if output_size is not None else output_ratio
    n = spatial_rank(fname, "output_size" if output_size is not None else "output_ratio", given)
    axes, _, sizes = layout_sizes(fname, x, n, data_format)
    outs = output_sizes(fname, sizes, output_size, output_ratio)
    check_fits(fname, sizes, outs)
    check_index_volume(fname, sizes, return_indices)
    bounds = graham_bounds(check_key(fname, key), sizes, outs, pseudo_random)
    plans, aux = [], []
    for axis, size, out, b in zip(axes, sizes, outs, bounds, strict=True):
        aux.append(graham_windows(b, size, overlapping))
        plans.append(FractionalPlan(axis, size, graham_kernel(size, out, overlapping), out))
    return pool(x, tuple(plans), tuple(aux), return_indices)

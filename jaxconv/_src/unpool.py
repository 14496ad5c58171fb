"""Max unpooling: the inverse scatter of max pooling's indices, for any number of spatial axes.

Every (batch, channel) plane is flattened; input position ``i`` writes ``x[i]`` at flat output
position ``indices[i]`` of a zero array. Where several inputs name the same output position
(overlapping pooling windows), the last one in row-major input order wins, which is what
PyTorch's CPU kernel does on one thread (on several, its threads race for such positions).
jaxconv makes that rule deterministic on every backend without relying on scatter order: a
``max`` scatter of the input *positions* (commutative, so order-free) finds the winner of each
output position, and a gather reads its value. The output is then a gather of ``x``: linear,
differentiable in both modes, and its gradient is the gather of the cotangent at
``indices`` (zero for inputs that lost to a later duplicate).

Where the windows tile the output (stride == window), every index that max pooling produced lies
in its own window, and each output position can only receive the value of the one window that
covers it: the output is that window's value where its index names the position, zero elsewhere
(a broadcast, a compare and a select; its gradient a window sum). A run-time check that every index
lies in its own window picks that path, and the scatter otherwise, so any ``indices`` give the
same result.
"""

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxconv._src.args import as_array, check_floating, is_int, layout_axes, per_axis, spatial_rank
from jaxconv._src.arithmetic import resolve_padding
from jaxconv._src.boxmap import window_shapes

_FNAME = "max_unpool"
_INT32_MAX = 2**31 - 1


def _host_indices(indices):
    """Concrete 64-bit indices, with every entry outside ``[0, 2**31)`` made ``-1`` when JAX
    holds integers as int32 (``jax_enable_x64`` off), where converting would wrap them into
    range: such an index lies past any output (its volume fits int32), so it stays dropped."""
    if isinstance(indices, jax.Array) or jax.config.jax_enable_x64:
        return indices
    try:
        host = np.asarray(indices)
    except (TypeError, ValueError):  # as_array reports it
        return indices
    if host.dtype.kind not in "iu" or host.dtype.itemsize <= 4:
        return indices
    return np.where((host < 0) | (host > _INT32_MAX), -1, host).astype(np.int32)


def _check_indices(x: jax.Array, indices) -> jax.Array:
    indices = as_array(_FNAME, "indices", _host_indices(indices))
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(
            f"{_FNAME}: `indices` must be an integer array (as returned by max_pool with "
            f"return_indices=True), got dtype {indices.dtype}."
        )
    if indices.shape != x.shape:
        raise ValueError(
            f"{_FNAME}: `indices` must have the shape of `x`, {x.shape}, got {indices.shape}."
        )
    return indices


def _default_sizes(in_sizes, kernel, stride, pads) -> tuple[int, ...]:
    return tuple(
        (i - 1) * s - lo - hi + k
        for i, k, s, (lo, hi) in zip(in_sizes, kernel, stride, pads, strict=True)
    )


def _output_sizes(output_size, default, stride, shape, axes) -> tuple[int, ...]:
    """``output_size`` (``n`` spatial sizes or the full output shape) checked against PyTorch's
    rule ``default - stride < size < default + stride``."""
    sizes = default if output_size is None else _requested_sizes(output_size, default, shape, axes)
    if output_size is not None:
        for size, d, s in zip(sizes, default, stride, strict=True):
            if not d - s < size < d + s:
                raise ValueError(
                    f"{_FNAME}: `output_size` {tuple(sizes)} is out of range: each spatial "
                    f"size must be strictly between default - stride and default + stride, "
                    f"with default sizes {default} and stride {stride}."
                )
    if any(v < 1 for v in sizes):
        raise ValueError(
            f"{_FNAME}: the output spatial sizes must be >= 1, got {sizes}; is `padding` too "
            "large for the window and stride?"
        )
    if math.prod(sizes) > _INT32_MAX:
        raise ValueError(
            f"{_FNAME}: the output spatial volume must be at most {_INT32_MAX} (int32 "
            f"indices), got sizes {sizes}."
        )
    return sizes


def _requested_sizes(output_size, default, shape, axes) -> tuple[int, ...]:
    """The spatial sizes of ``output_size``: ``n`` ints, or the full output shape whose batch
    and channel sizes are those of ``x``."""
    n = len(default)
    if not isinstance(output_size, Sequence) or isinstance(output_size, str):
        raise TypeError(
            f"{_FNAME}: `output_size` must be None or a sequence of ints, got {output_size!r}."
        )
    if not all(is_int(v) for v in output_size):
        raise TypeError(f"{_FNAME}: `output_size` must contain ints, got {output_size!r}.")
    if len(output_size) == len(shape) and len(shape) != n:
        full = tuple(int(v) for v in output_size)
        others = [a for a in range(len(shape)) if a not in axes]
        if any(full[a] != shape[a] for a in others):
            raise ValueError(
                f"{_FNAME}: `output_size` given as a full shape {full} must keep the batch "
                f"and channel sizes of `x` {shape}."
            )
        output_size = [full[a] for a in axes]
    if len(output_size) != n:
        raise ValueError(
            f"{_FNAME}: `output_size` must have {n} entries (spatial sizes) or "
            f"{len(shape)} (the full output shape), got {output_size!r}."
        )
    return tuple(int(v) for v in output_size)


def _scatter_planes(values: jax.Array, indices: jax.Array, length: int, axis: int) -> jax.Array:
    """3-D ``values`` (batch first, the flat spatial axis ``axis`` and the channel axis) scattered
    into ``length`` spatial positions; out-of-range indices are dropped. The channel axis stays
    where it is, so that the output needs no transpose."""
    ok = indices >= 0
    if jnp.iinfo(indices.dtype).max >= length:
        ok = ok & (indices < length)
    target = jnp.where(ok, indices.astype(jnp.int32), length)
    out_shape = list(values.shape)
    out_shape[axis] = length
    grid = [lax.broadcasted_iota(jnp.int32, values.shape, d) for d in range(3)]
    source = grid[axis]
    grid[axis] = target
    winner = jnp.full(out_shape, -1, jnp.int32).at[tuple(grid)].max(source, mode="drop")
    picked = jnp.take_along_axis(values, jnp.maximum(winner, 0), axis=axis)
    return jnp.where(winner >= 0, picked, jnp.zeros((), values.dtype))


def _local_unpool(x, indices, axes, kernel, pads, sizes):
    """The output when every index lies in its own window (stride == window): each input
    broadcast over its window, kept where its index names the position."""
    k_of = dict(zip(axes, kernel, strict=True))
    expanded, wide = window_shapes(x.shape, k_of)
    position, step = jnp.zeros(wide, jnp.int32), 1
    for a, k, (lo, _), size in reversed(list(zip(axes, kernel, pads, sizes, strict=True))):
        w = a + sum(1 for b in axes if b < a)  # where axis a sits in the wide shape
        coord = lax.broadcasted_iota(jnp.int32, wide, w) * k
        coord = coord + lax.broadcasted_iota(jnp.int32, wide, w + 1) - lo
        position = position + coord * step
        step *= size
    hit = indices.astype(jnp.int32).reshape(expanded) == position
    out = jnp.where(hit, x.reshape(expanded), jnp.zeros((), x.dtype))
    out = out.reshape([n * k_of.get(axis, 1) for axis, n in enumerate(x.shape)])
    config = [(0, 0, 0)] * x.ndim
    for a, (lo, _), size in zip(axes, pads, sizes, strict=True):
        config[a] = (-lo, lo + size - out.shape[a], 0)
    return lax.pad(out, jnp.zeros((), x.dtype), config)


def _all_local(indices, axes, kernel, pads, sizes) -> jax.Array:
    """Whether every index names a position inside its own window (stride == window).

    Where the windows start at 0 and lie inside the output, an index is local when its distance
    from its window's first position is one of the window's ``prod(kernel)`` offsets: a few
    compares (max_unpool 2x2 on (32, 28, 28, 64): the check 0.2 ms against 0.7-1.1 ms with the
    integer divisions below, which do not vectorise).
    """
    index = indices.astype(jnp.int32)
    steps = [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]
    inside = all(
        lo == 0 and indices.shape[a] * k <= size
        for a, k, (lo, _), size in zip(axes, kernel, pads, sizes, strict=True)
    )
    if inside and math.prod(kernel) <= 16:
        base = functools.reduce(
            jnp.add,
            [
                lax.broadcasted_iota(jnp.int32, index.shape, a) * (k * step)
                for a, k, step in zip(axes, kernel, steps, strict=True)
            ],
        )
        distance = index - base
        offsets = [
            sum(j * step for j, step in zip(combo, steps, strict=True))
            for combo in itertools.product(*(range(k) for k in kernel))
        ]
        local = functools.reduce(jnp.logical_or, [distance == o for o in offsets])
        return jnp.all(local)
    local = (index >= 0) & (index < math.prod(sizes))
    rest = index
    for a, k, (lo, _), size in reversed(list(zip(axes, kernel, pads, sizes, strict=True))):
        here, rest = rest % size, rest // size
        local = local & ((here + lo) // k == lax.broadcasted_iota(jnp.int32, index.shape, a))
    return jnp.all(local)


def _unpool_scatter(x, indices, axes, channel_axis, sizes):
    """The scatter form of :func:`max_unpool`, in the layout of ``x``."""
    lead = math.prod(x.shape[: min(axes[0], channel_axis)])
    length_in, channels = math.prod(x.shape[a] for a in axes), x.shape[channel_axis]
    last = channel_axis > axes[0]
    shape = (lead, length_in, channels) if last else (lead, channels, length_in)
    flat = _scatter_planes(
        x.reshape(shape), indices.reshape(shape), math.prod(sizes), 1 if last else 2
    )
    out_shape = list(x.shape)
    for a, size in zip(axes, sizes, strict=True):
        out_shape[a] = size
    return flat.reshape(out_shape)


def max_unpool(
    x: ArrayLike,
    indices: ArrayLike,
    window,
    stride=None,
    padding=0,
    *,
    output_size=None,
    data_format: str = "channels_last",
) -> jax.Array:
    """Partial inverse of :func:`jaxconv.max_pool`: ``x`` written at ``indices``, zeros elsewhere.

    Each (batch, channel) plane of the output is a zero array of the output spatial size; the
    input value at each position goes to the flat row-major position ``indices`` names in that
    plane (``h*W + w`` in 2-D), as PyTorch's ``max_unpool{1,2,3}d``.

    Differences from PyTorch, both forced by tracing (the indices are data, unknown when the
    program is built): an index outside ``[0, prod(output spatial size))`` is dropped (nothing
    is written) where PyTorch raises at run time. Where several inputs name one position
    (overlapping windows), the last in row-major input order wins on every backend, which is
    PyTorch's CPU result; PyTorch on GPU leaves it unspecified.

    Args:
      x: ``(*batch, *spatial, C)`` for channels_last or ``(*batch, C, *spatial)`` for
        channels_first, a floating dtype.
      indices: integer array shaped like ``x``, e.g. from ``max_pool(...,
        return_indices=True)`` with the same window arguments.
      window: the pooling window size per spatial axis, a sequence of ``n`` ints.
      stride: an int or ``n`` ints; ``None`` means ``window``.
      padding: the pooling padding: an int, ``n`` ints, ``n`` ``(lo, hi)`` pairs or "VALID"
        ("SAME" depends on the pooled input's size: pass ``output_size`` instead).
      output_size: ``None``, ``n`` spatial sizes, or the full output shape (batch and channel
        sizes as in ``x``). Each spatial size must lie strictly between ``default - stride``
        and ``default + stride``, where ``default = (in - 1)*s - lo - hi + k`` (PyTorch's rule).
      data_format: "channels_last" or "channels_first".

    Returns:
      ``x.shape`` with the spatial sizes replaced by the output size, dtype ``x.dtype``.

    Transformations: ``jit``, ``vmap``, ``grad``/``vjp`` and ``jvp`` with respect to ``x``
    (the op is linear in ``x``: a gather), and higher orders (zero). ``indices`` are integers
    and carry no derivative. The gradient is the true derivative of the result: the cotangent
    gathered at ``indices``, except that an input which lost its output position to a later
    duplicate (overlapping windows) gets 0. PyTorch gives every duplicate the gathered
    cotangent, although only the last one reaches the output.

    Example:
      >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
      >>> y, i = max_pool(x, (2, 2), return_indices=True)
      >>> max_unpool(y, i, (2, 2))[0, ..., 0]
      Array([[ 0.,  0.,  0.,  0.],
             [ 0.,  5.,  0.,  7.],
             [ 0.,  0.,  0.,  0.],
             [ 0., 13.,  0., 15.]], dtype=float32)
    """
    x = check_floating(_FNAME, "x", x)
    indices = _check_indices(x, indices)
    n = spatial_rank(_FNAME, "window", window)
    kernel = per_axis(_FNAME, "window", window, n)
    strides = kernel if stride is None else per_axis(_FNAME, "stride", stride, n)
    axes, channel_axis = layout_axes(_FNAME, x.ndim, n, data_format)
    pads = resolve_padding(
        _FNAME, padding, n, kernel=kernel, stride=strides, dilation=(1,) * n, allowed=("VALID",)
    )
    in_sizes = tuple(x.shape[a] for a in axes)
    default = _default_sizes(in_sizes, kernel, strides, pads)
    sizes = _output_sizes(output_size, default, strides, x.shape, axes)
    geometry = _Geometry(axes, channel_axis, kernel, strides, pads, sizes)
    if jnp.finfo(x.dtype).bits < 32:
        return _unpool_narrow(x, indices, geometry)
    return _unpool(x, indices, geometry)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """The static layout of one unpooling: spatial and channel axes, window, output sizes."""

    axes: tuple[int, ...]
    channel_axis: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    sizes: tuple[int, ...]


def _unpool(x, indices, g: _Geometry) -> jax.Array:
    """The select form where every index lies in its own tiling window, else the scatter."""
    if g.strides != g.kernel:
        return _unpool_scatter(x, indices, g.axes, g.channel_axis, g.sizes)
    # The broadcast runs inside the branch, which writes the result in place (computed outside
    # and passed in, it was copied: max_unpool 2x2 on (32, 28, 28, 64) 3.0 ms against 1.5 ms).
    local = _all_local(indices, g.axes, g.kernel, g.pads, g.sizes)
    if jnp.iinfo(indices.dtype).max > _INT32_MAX:  # checked before int32 could wrap an index
        local = local & jnp.all((indices >= 0) & (indices < math.prod(g.sizes)))
    return lax.cond(
        local,
        lambda x, indices: _local_unpool(x, indices, g.axes, g.kernel, g.pads, g.sizes),
        lambda x, indices: _unpool_scatter(x, indices, g.axes, g.channel_axis, g.sizes),
        x,
        indices,
    )


# float16/bfloat16: the values move as they are, but the tangent runs in float32, so the
# gradient sums each window in float32 and rounds once (XLA's CPU loops round every 16-bit
# add). bfloat16 2x2 on (32, 28, 28, 64), forward plus backward: 5.8 against 9.2 ms.
@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _unpool_narrow(x, indices, g: _Geometry) -> jax.Array:
    return _unpool(x, indices, g)


@_unpool_narrow.defjvp
def _unpool_narrow_jvp(g, primals, tangents):
    x, indices = primals
    tangent = _unpool(tangents[0].astype(jnp.float32), indices, g).astype(x.dtype)
    return _unpool_narrow(x, indices, g), tangent

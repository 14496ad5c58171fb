"""Fractional max pooling: PyTorch's kernel-based sequences and Graham's ratio-based ones.

Both are box windows whose per-axis starts are random, so each spatial axis is a
:class:`FractionalPlan` whose traced data (``aux``) is ``(start, length)``: the window start of
every output position (per batch and channel for PyTorch's sequences, shared for Graham's) and,
for Graham's variable windows, the window lengths. The max, PyTorch's tie rule, the flat indices
and the linear ``custom_jvp`` tangent all come from :mod:`jaxconv._src.select`.

PyTorch's sequence (``FractionalMaxPooling.h``), for input length ``in``, window ``k``, output
length ``out`` and a sample ``u`` in [0, 1) per (batch, channel, axis), computed in the sample's
dtype exactly as PyTorch does (``alpha`` rounded to that dtype, then the products)::

    alpha = (in - k) / (out - 1)
    start[i] = int((i + u) * alpha) - int(u * alpha)     for i < out - 1
    start[out - 1] = in - k                              (also when out == 1)

Graham's sequences live in :mod:`jaxconv._src.graham` and reuse this module's plan.

With an integer ``alpha`` on every axis (2x2 at ratio 0.5 on even sizes) start ``i`` is
``i*alpha`` unless rounding moved it (``u`` so close to 1 that ``i + u`` rounds up). Where no
start moved, a ``lax.cond`` runs a regular max pool instead (:mod:`jaxconv._src.joint`).
CPU, float32 NHWC (32, 56, 56, 64), 2x2 -> 28x28: forward plus backward 3.6 ms against 20.9 ms
for the general path (PyTorch channels_last about 16 ms). Under ``vmap`` over the samples the
condition is batched and both paths run.

Otherwise taps are gathers (``take_along_axis`` for per-channel starts, ``take`` for shared ones).
With an integer ``alpha`` off the grid, the tangent pick is a regular pick over a band
(``FractionalPlan.pick``), in 16-bit dtypes too, whose coarse ``i + u`` moves many starts:
bfloat16 2x2 on the shape above, forward plus backward 15 against 18 ms with the gathers'
scatter, when its reverse mode was pads and adds (as it still is on GPUs). On the CPU its
adjoint is now :mod:`jaxconv._src.block_pick`'s, which keeps the offsets rather than a mask per
block shift, masks that the regular path's branch of the condition wrote out as well: in one
run of 30 interleaved calls on a machine whose memory moved 5 GB/s, bfloat16 28.7 against 31.5
ms, float32 (starts on the grid: the regular path) 6.3 against 8.8 ms. With a non-integer
``alpha`` (2x2 at ratio 0.7, 56 -> 39;
3x3, 56 -> 27) start ``i`` is ``floor(i*alpha)`` or one more, up to rounding: the tangent picks
from a band of static slices at ``floor(i*alpha) - 1`` (``FractionalPlan._base_pick``), whose
transpose gathers: float32 (32, 56, 56, 64), forward plus backward 29 and 27 ms against 79 and
85 ms with the gathers' scatter (PyTorch channels_last 28 and 24 ms), on a normal day. Along
an inner spatial axis the rows scatter over the spatial axes merged, batched over the batch
(``_rows_to`` in ``fractional_plan``): along the axis alone, XLA laid each axis's gradient out
with that axis first and copied it back (2x2 at ratio 0.7, float32 60 against 70 ms, bfloat16
34 against 42, channels_first float32 66 against 93, on a machine whose memory moved 10 GB/s);
merged with the batch too, a batch-sharded gradient gathered across devices. Where neither
band holds (16-bit samples on long axes) and for Graham's windows, the tangent stacks a
window's taps with one gather (``FractionalPlan.window``), so reverse mode scatters once per
axis instead of once per tap; on GPUs, where a scatter-add of colliding indices sums in a
varying order, it gathers tap by tap instead (``FractionalPlan.distinct_taps``), each tap's
indices unique because the starts strictly increase (``alpha >= 1``), checked at run time.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxconv._src.argmax import select_max
from jaxconv._src.args import (
    check_bool,
    check_floating,
    check_index_volume,
    is_real,
    layout_axes,
    per_axis,
    spatial_rank,
)
from jaxconv._src.fractional_plan import FractionalPlan, band_holds
from jaxconv._src.window import AxisPlan


def pool(x, plans, aux, return_indices):
    """The max over the plans' windows (and the flat indices of the winners)."""
    return select_max(x, aux, plans, return_indices)


# PyTorch's kernel-based sequence.


def _alpha(size: int, out: int, kernel: int, dtype) -> np.ndarray:
    """``(in - k) / (out - 1)`` rounded as PyTorch rounds it in ``dtype``.

    float16/bfloat16: both operands are converted to ``dtype``, divided in float32 and the
    quotient rounded to ``dtype`` (c10's Half/BFloat16 arithmetic).
    """
    dtype = np.dtype(dtype)
    if dtype.itemsize >= 4:
        return np.asarray(size - kernel, dtype) / np.asarray(out - 1, dtype)
    num = np.asarray(size - kernel).astype(dtype).astype(np.float32)
    den = np.asarray(out - 1).astype(dtype).astype(np.float32)
    return (num / den).astype(dtype)


def torch_starts(u: jax.Array, size: int, out: int, kernel: int) -> jax.Array:
    """PyTorch's window starts for samples ``u`` (any shape): int32, shape ``(*u.shape, out)``."""
    last = jnp.full((*u.shape, 1), size - kernel, jnp.int32)
    if out == 1:
        return last
    alpha = jnp.asarray(_alpha(size, out, kernel, u.dtype))
    i = jnp.arange(out - 1).astype(u.dtype)
    u = u[..., None]
    if jnp.finfo(u.dtype).bits < 32:
        # Each 16-bit value rounded explicitly, the operands too: XLA's GPU compiler computes
        # 16-bit arithmetic in float32 and drops a rounding conversion to 16 bits and back
        # ("excess precision"), so a 16-bit value it gets may still hold float32 digits.
        info = jnp.finfo(u.dtype)
        rounded = functools.partial(
            lax.reduce_precision, exponent_bits=info.nexp, mantissa_bits=info.nmant
        )
        i = jnp.arange(out - 1, dtype=jnp.float32)
        i, u, alpha = (rounded(v.astype(jnp.float32)) for v in (i, u, alpha))
        start = rounded(rounded(i + u) * alpha).astype(jnp.int32)
        return jnp.concatenate([start - rounded(u * alpha).astype(jnp.int32), last], axis=-1)
    start = ((i + u) * alpha).astype(jnp.int32) - (u * alpha).astype(jnp.int32)
    return jnp.concatenate([start, last], axis=-1)


# Argument checking.


def _ratios(fname: str, output_ratio, n: int) -> tuple[float, ...]:
    if is_real(output_ratio):
        ratios = (float(output_ratio),) * n
    elif isinstance(output_ratio, Sequence) and not isinstance(output_ratio, str):
        if len(output_ratio) != n or not all(is_real(r) for r in output_ratio):
            raise ValueError(
                f"{fname}: `output_ratio` must hold {n} floats, one per spatial axis, "
                f"got {output_ratio!r}."
            )
        ratios = tuple(float(r) for r in output_ratio)
    else:
        raise TypeError(
            f"{fname}: `output_ratio` must be a float or a sequence of {n} floats, "
            f"got {output_ratio!r} of type {type(output_ratio).__name__}."
        )
    if not all(0.0 < r < 1.0 for r in ratios):
        raise ValueError(
            f"{fname}: every `output_ratio` must lie in the open interval (0, 1), "
            f"got {output_ratio!r}."
        )
    return ratios


def check_one_size(fname, output_size, output_ratio):
    if (output_size is None) == (output_ratio is None):
        raise ValueError(
            f"{fname}: pass exactly one of `output_size` and `output_ratio`, got "
            f"output_size={output_size!r} and output_ratio={output_ratio!r}."
        )


def output_sizes(fname, sizes, output_size, output_ratio) -> tuple[int, ...]:
    """Exactly one of ``output_size`` / ``output_ratio`` as ``n`` output lengths >= 1."""
    n = len(sizes)
    check_one_size(fname, output_size, output_ratio)
    if output_size is not None:
        return per_axis(fname, "output_size", output_size, n)
    outs = tuple(int(s * r) for s, r in zip(sizes, _ratios(fname, output_ratio, n), strict=True))
    if any(o < 1 for o in outs):
        raise ValueError(
            f"{fname}: `output_ratio` {output_ratio!r} gives the output size {outs} for the "
            f"input size {sizes}; every output size must be >= 1."
        )
    return outs


def check_fits(fname, sizes, outs, kernel=None):
    """``out + k - 1 <= in`` on every axis; ``out <= in`` where there is no window (None)."""
    for axis, (size, out) in enumerate(zip(sizes, outs, strict=True)):
        k = 1 if kernel is None else kernel[axis]
        if out + k - 1 <= size:
            continue
        if kernel is None:
            need = f"output size {out} exceeds spatial axis {axis} of size {size}"
            raise ValueError(f"{fname}: {need}; need output_size <= input size.")
        raise ValueError(
            f"{fname}: output size {out} with window {k} does not fit spatial axis {axis} "
            f"of size {size}; need output_size + window - 1 <= input size."
        )


def check_key(fname: str, key) -> jax.Array:
    if not isinstance(key, (jax.Array, np.ndarray)):
        raise TypeError(
            f"{fname}: `key` must be a PRNG key (jax.random.key(...) or "
            f"jax.random.PRNGKey(...)), got {key!r} of type {type(key).__name__}."
        )
    key = jnp.asarray(key)
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not ((typed and key.shape == ()) or (key.dtype == jnp.uint32 and key.shape == (2,))):
        raise TypeError(
            f"{fname}: `key` must be a single PRNG key (jax.random.key(...) or "
            f"jax.random.PRNGKey(...)), got dtype {key.dtype} and shape {key.shape}."
        )
    return key


def _samples(fname, x, key, samples, n, lead, channels) -> jax.Array:
    """The samples ``u``, shape ``(*lead, C, n)`` in ``x.dtype``, from ``key`` or ``samples``."""
    if (key is None) == (samples is None):
        got = "neither" if key is None else "both"
        raise ValueError(f"{fname}: pass exactly one of `key` and `samples`, got {got}.")
    shape = (*lead, channels, n)
    if key is not None:
        return jax.random.uniform(check_key(fname, key), shape, x.dtype)
    raw = samples
    samples = check_floating(fname, "samples", samples)
    if samples.shape != shape:
        raise ValueError(
            f"{fname}: `samples` must have shape (*batch, C, n) = {shape}, got {samples.shape}."
        )
    if not isinstance(raw, jax.core.Tracer):
        values = np.asarray(raw).astype(x.dtype).astype(np.float64)
        if values.size and not (values.min() >= 0.0 and values.max() < 1.0):
            raise ValueError(
                f"{fname}: `samples` must lie in [0, 1) in x's dtype {x.dtype}, got values in "
                f"[{values.min()}, {values.max()}]."
            )
    return samples.astype(x.dtype)


def _spread_starts(start, i, n, channels_last):
    """Starts ``(*lead, C, out)`` of spatial axis ``i`` shaped to broadcast against ``x``."""
    *lead, channels, out = start.shape
    ones = (1,) * i, (1,) * (n - 1 - i)
    if channels_last:
        return jnp.swapaxes(start, -1, -2).reshape(*lead, *ones[0], out, *ones[1], channels)
    return start.reshape(*lead, channels, *ones[0], out, *ones[1])


def layout_sizes(fname, x, n, data_format):
    axes, channel_axis = layout_axes(fname, x.ndim, n, data_format)
    sizes = tuple(x.shape[a] for a in axes)
    if any(s < 1 for s in sizes):
        raise ValueError(f"{fname}: spatial sizes of `x` must be >= 1, got {sizes}.")
    return axes, channel_axis, sizes


def fractional_max_pool(
    x: ArrayLike,
    window,
    *,
    output_size=None,
    output_ratio=None,
    key: ArrayLike | None = None,
    samples: ArrayLike | None = None,
    return_indices: bool = False,
    data_format: str = "channels_last",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Fractional max pooling with PyTorch's window sequences (``FractionalMaxPool{2,3}d``).

    Every (batch, channel) draws one sample ``u`` in [0, 1) per spatial axis; along an axis of
    input length ``in``, window ``k`` and output length ``out``, output ``i`` is the max over
    ``[start[i], start[i] + k)`` with::

        alpha = (in - k) / (out - 1)
        start[i] = int((i + u) * alpha) - int(u * alpha)    for i < out - 1
        start[out - 1] = in - k                             (also when out == 1)

    computed in ``x``'s dtype as PyTorch computes it, so with the same samples the output and
    the indices equal ``torch.nn.functional.fractional_max_pool{2,3}d(...,
    _random_samples=...)``. Ties and NaN follow PyTorch (first maximum wins, NaN propagates).
    Any number of spatial axes works (1-D too). Every axis needs ``out + k - 1 <= in``
    (PyTorch's 2-D rule; its 3-D check is stricter, ``<``).

    Args:
      x: ``(*batch, *spatial, C)`` for channels_last or ``(*batch, C, *spatial)`` for
        channels_first, a floating dtype.
      window: the window size ``k`` per spatial axis, a sequence of ``n`` ints.
      output_size: an int or ``n`` ints; exactly one of this and ``output_ratio``.
      output_ratio: a float or ``n`` floats in (0, 1); ``out = int(in * ratio)``.
      key: a PRNG key; the samples are ``jax.random.uniform(key, (*batch, C, n), x.dtype)``.
        Exactly one of ``key`` and ``samples``.
      samples: ``(*batch, C, n)`` values in [0, 1), spatial axis 0 first (PyTorch's 2-D
        ``_random_samples`` lists W first: pass ``torch_samples[..., ::-1]``; its 3-D order is
        already T, H, W). Converted to ``x.dtype``; the range is checked when not traced.
      return_indices: also return the flat index of every maximum.
      data_format: "channels_last" or "channels_first".

    Returns:
      The pooled array (spatial sizes replaced by the output sizes, dtype ``x.dtype``); with
      ``return_indices``, also the int32 flat index of each maximum in the spatial volume of its
      (batch, channel) (``h*W + w`` in 2-D, ``(d*H + h)*W + w`` in 3-D).

    Transformations: ``jit``, ``vmap`` (over ``x``, ``key`` or ``samples``), ``grad``/``vjp``,
    ``jvp`` and higher orders in ``x``; the derivative sends the cotangent to the selected
    maximum only, as PyTorch's. The samples get no gradient. Unless ``alpha`` is an integer,
    reverse mode transposes gathers into scatter-adds, bitwise reproducible: on the CPU one
    per axis; on GPUs one per window tap, each of unique indices. The exception, on GPUs only:
    where the samples' rounding repeats a window start before the last (bfloat16 on axes of
    more than about 150 outputs), the one scatter per axis runs, and it may sum the cotangents
    of overlapping windows in a varying order.

    Example:
      >>> x = jnp.arange(25.0).reshape(1, 5, 5, 1)
      >>> y = fractional_max_pool(x, (2, 2), output_size=3, key=jax.random.key(0))
      >>> y.shape
      (1, 3, 3, 1)
    """
    fname = "fractional_max_pool"
    x = check_floating(fname, "x", x)
    return_indices = check_bool(fname, "return_indices", return_indices)
    n = spatial_rank(fname, "window", window)
    kernel = per_axis(fname, "window", window, n)
    axes, channel_axis, sizes = layout_sizes(fname, x, n, data_format)
    outs = output_sizes(fname, sizes, output_size, output_ratio)
    check_fits(fname, sizes, outs, kernel)
    check_index_volume(fname, sizes, return_indices)
    lead = x.shape[: min(axes[0], channel_axis)]
    u = lax.stop_gradient(_samples(fname, x, key, samples, n, lead, x.shape[channel_axis]))
    plans, aux, starts = [], [], []
    rows = zip(axes, sizes, kernel, outs, strict=True)
    for i, (axis, size, k, out) in enumerate(rows):
        # PyTorch's formula in 16 bits can pass the last start on long axes (PyTorch then
        # fails an assertion); clipped, every window lies inside the input
        starts.append(jnp.clip(torch_starts(u[..., i], size, out, k), 0, size - k))
        aux.append((_spread_starts(starts[-1], i, n, data_format == "channels_last"), None))
        step = (size - k) // (out - 1) if out > 1 and (size - k) % (out - 1) == 0 else None
        step = step if size < 2**24 else None
        band = band_holds(size, x.dtype, integer_alpha=step is not None)
        plan = FractionalPlan(axis, size, k, out, step, band, last=i == n - 1, first=axes[0])
        plans.append(plan)
    return _pool_fractional(x, tuple(plans), tuple(aux), starts, return_indices)


def _pool_fractional(x, plans, aux, starts, return_indices):
    """:func:`pool` over PyTorch's windows. With an integer alpha on every axis, start ``i`` is
    ``i*alpha`` unless rounding of ``(i + u)*alpha`` moved it; where no start moved, a
    ``lax.cond`` runs the regular max pool instead (no gathers or scatters)."""
    if any(p.step is None for p in plans):
        return pool(x, plans, aux, return_indices)
    regular = tuple(AxisPlan(p.axis, p.size, p.kernel, p.step, 1, 0, 0, p.out) for p in plans)
    on_grid = functools.reduce(
        jnp.logical_and,
        [
            jnp.all(s == np.arange(p.out, dtype=np.int32) * p.step)
            for s, p in zip(starts, plans, strict=True)
        ],
    )
    return lax.cond(
        on_grid,
        lambda v: select_max(v, (None,) * len(plans), regular, return_indices),
        lambda v: pool(v, plans, aux, return_indices),
        x,
    )

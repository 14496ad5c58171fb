"""Depthwise convolution on the CPU as a sum of window taps.

A convolution with one input channel per group (``groups`` equal to the channels: MobileNet's and
ConvNeXt's depthwise layers) multiplies each channel by its own small kernel. XLA's CPU backend
runs it as a dense convolution with a block-diagonal kernel, ``channels`` times the work: float32
NHWC (8, 56, 56, 64) with a 3x3 kernel took 31 ms forward and 76 ms forward plus backward (for
``x`` and ``w``), where PyTorch channels_last takes 0.2 and 0.9 ms. Here the output is the sum,
over the kernel's taps, of the input's strided slices times the tap's weight per channel: the
interior and the borders apart (:func:`~jaxconv._src.boxmap.box_map`), 0.3 ms forward. (Splitting
the borders further so that taps reading padding drop out compiled a 7x7 kernel in 4-21 s.)

The derivative is a ``jax.custom_jvp``. Its tangent is the same sum over the slices of the
zero-padded input, linear in ``x`` and in ``w``; XLA transposes it into pads and one reduction
per tap: forward plus backward 6 ms (the transpose of the interior and border blocks took 17
ms). Forward mode and higher orders work. 16-bit inputs are multiplied and summed in float32
and rounded once (bfloat16 on the bit patterns, :func:`~jaxconv._src.cast.narrow`; the sum is
written out first, as fusing it into the rounding took 1.7 against 0.7 ms). Kernels of more
than ``MAX_TAPS`` taps compile too slowly this way (5x5x5: 7 s) and run as one convolution per
channel (:mod:`jaxconv._src.grouped`).

GPUs keep XLA's convolution (``lax.platform_dependent``): cuDNN has depthwise kernels.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxconv._src.boxmap import box_map, box_taps, compute_dtype
from jaxconv._src.cast import narrow
from jaxconv._src.window import AxisPlan

MAX_TAPS = 49  # kernels up to 7x7 (ConvNeXt)


def depthwise_plans(axes, sizes, kernel, stride, dilation, pads) -> tuple[AxisPlan, ...]:
    """The window plan of each spatial axis of a convolution."""
    rows = zip(axes, sizes, kernel, stride, dilation, pads, strict=True)
    return tuple(
        AxisPlan(a, n, k, s, d, lo, hi, (n + lo + hi - d * (k - 1) - 1) // s + 1)
        for a, n, k, s, d, (lo, hi) in rows
    )


def is_depthwise(groups: int, channels: int, w_in: int, kernel) -> bool:
    """One input channel per group, more than one group, and at most ``MAX_TAPS`` taps."""
    return groups == channels > 1 and w_in == 1 and math.prod(kernel) <= MAX_TAPS


class _Geometry(NamedTuple):
    plans: tuple[AxisPlan, ...]
    channel_axis: int
    channels_last: bool
    channels: int  # input channels, before the multiplier
    out_dtype: object = None  # the result's; None: the inputs'


def depthwise_conv(x, w, plans, channel_axis: int, channels_last: bool, xla_conv, out_dtype=None):
    """``xla_conv(x, w)`` for a depthwise ``w``, as a sum of taps on the CPU. ``out_dtype``: the
    result's (``xla_conv``'s too), None for the inputs'."""
    channels = x.shape[channel_axis]
    geometry = _Geometry(plans, channel_axis, channels_last, channels, out_dtype)
    taps = functools.partial(_taps_conv, geometry=geometry)
    return lax.platform_dependent(x, w, cpu=taps, default=xla_conv)


def _tap_weights(w, geometry, ndim: int) -> list[jax.Array]:
    """Per tap (row-major over the kernel), the weights shaped to broadcast on the output."""
    if not geometry.channels_last:  # (O, 1, *kernel) -> (*kernel, 1, O)
        w = jnp.moveaxis(w, (0, 1), (-1, -2))
    w = w.reshape(-1, w.shape[-1])
    shape = [1] * ndim
    shape[geometry.channel_axis] = w.shape[-1]
    return [w[t].reshape(shape) for t in range(w.shape[0])]


def _widened(x, w, geometry):
    """``x`` repeated for the channel multiplier, both in the compute dtype."""
    dtype = compute_dtype(jnp.result_type(x, w))
    x, w = x.astype(dtype), w.astype(dtype)
    taps = math.prod(p.kernel for p in geometry.plans)
    multiplier = w.size // (geometry.channels * taps)
    if multiplier > 1:
        x = jnp.repeat(x, multiplier, axis=geometry.channel_axis)
    return x, w


def _weighted_sum(parts, weights):
    """``sum(part * weight)`` over the taps."""
    return functools.reduce(jnp.add, [p * wt for p, wt in zip(parts, weights, strict=True)])


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _taps_conv(x, w, geometry):
    dtype = jnp.result_type(x, w)
    x, w = _widened(x, w, geometry)
    weights = _tap_weights(w, geometry, x.ndim)
    total = box_map(x, geometry.plans, lambda parts, _: _weighted_sum(parts, weights), 0)
    if geometry.out_dtype is not None:
        return total.astype(geometry.out_dtype)
    return narrow(total, dtype, fuse=False)


def _sliced_conv(x, w, geometry):
    """The same convolution over slices of the zero-padded ``x``: a form XLA transposes fast."""
    dtype = jnp.result_type(x, w)
    x, w = _widened(x, w, geometry)
    parts = box_taps(x, geometry.plans, 0)
    total = _weighted_sum(parts, _tap_weights(w, geometry, x.ndim))
    return total.astype(geometry.out_dtype or dtype)


def _taps_conv_jvp(geometry, primals, tangents):
    x, w = primals
    tx, tw = tangents
    out = _taps_conv(x, w, geometry)
    terms = []
    if not isinstance(tx, SymbolicZero):
        terms.append(_sliced_conv(tx, w, geometry))
    if not isinstance(tw, SymbolicZero):
        terms.append(_sliced_conv(x, tw, geometry))
    tangent = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(out)
    return out, tangent


_taps_conv.defjvp(_taps_conv_jvp, symbolic_zeros=True)

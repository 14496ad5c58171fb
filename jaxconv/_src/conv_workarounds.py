"""Padding that keeps the convolutions XLA sees clear of two CPU compiler bugs.

``lay`` below is the layout of :mod:`jaxconv._src.conv` (``kernel`` and ``spatial_axes``).
"""

import jax.numpy as jnp
from jax import lax

# XLA's CPU compiler (its convolution operand swap) reads an axis of a base-dilated convolution
# with window 2, base dilation 2, stride 1, no padding and no window dilation as a "group" axis,
# and aborts ("Window dimensions do not match RHS shape") when it also swaps the operands because
# the other axes' input is smaller than their kernel. Such a window arises on an axis with kernel
# 2, stride 2 and dilation 1: in ``conv_transpose`` when its adjoint padding is 0 on both sides,
# and in the gradient of ``conv`` when the low padding is 1. Padding those axes differently keeps
# every convolution XLA sees out of that pattern; nothing changes on other axes.


def _group_window_axes(stride, dilation, kernel) -> list[bool]:
    """Axes whose lhs-dilated convolution can take the form XLA mistakes for a group axis."""
    return [k == 2 and s == 2 and d == 1 for k, s, d in zip(kernel, stride, dilation, strict=True)]


def pad_explicitly(x, lay, stride, pads, dilation):
    """Padding the convolution's gradient would mishandle, applied to ``x`` explicitly.

    - Padding beyond the kernel's span ``d*(k-1)`` (outputs that read padding only): the
      gradient's transposed convolution would get negative padding, which XLA's CPU
      convolution gets wrong (it reads uninitialised memory).
    - The low padding of kernel-2, stride-2 axes, whose gradient would otherwise have the
      group-axis form (above).

    XLA folds the explicit padding into the forward convolution again.
    """
    risky = _group_window_axes(stride, dilation, lay.kernel)
    explicit = []
    for r, k, d, (lo, hi) in zip(risky, lay.kernel, dilation, pads, strict=True):
        span = d * (k - 1)
        explicit.append((lo if r else max(0, lo - span), max(0, hi - span)))
    if not any(lo or hi for lo, hi in explicit):
        return x, pads
    config = [(0, 0, 0)] * x.ndim
    for axis, (lo, hi) in zip(lay.spatial_axes, explicit, strict=True):
        config[axis] = (lo, hi, 0)
    x = lax.pad(x, jnp.zeros((), x.dtype), config)
    return x, tuple(
        (lo - e_lo, hi - e_hi) for (e_lo, e_hi), (lo, hi) in zip(explicit, pads, strict=True)
    )


def avoid_group_window(tpads, lay, stride, dilation):
    """One more output on the low side of axes whose adjoint convolution would have the
    group-axis form (kernel 2, stride 2, padding 0 on both sides); it is cropped off again."""
    risky = _group_window_axes(stride, dilation, lay.kernel)
    crop = [int(r and tuple(p) == (0, 0)) for r, p in zip(risky, tpads, strict=True)]
    return tuple((lo + c, hi) for c, (lo, hi) in zip(crop, tpads, strict=True)), crop


def crop_low(x, axes, amounts):
    """``x`` without the first ``amounts`` entries of ``axes``."""
    if not any(amounts):
        return x
    start = [0] * x.ndim
    for axis, amount in zip(axes, amounts, strict=True):
        start[axis] = amount
    return lax.slice(x, start, x.shape)

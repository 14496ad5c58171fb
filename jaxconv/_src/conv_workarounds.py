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


def adjoint_padding(tpads, lay, stride, dilation):
    """The padding of ``conv_transpose``'s input-dilated convolution, clear of both bugs, and the
    ``(lo, hi)`` crops of its output that make up the difference.

    - Negative padding (the convolution's padding beyond the kernel's span on that side): XLA's
      CPU convolution reads uninitialised memory with a negative low padding (raw ``lax``: y
      ``(1, 4, 5, 2)``, a 2x2 kernel, padding ``((-1, 1), (-1, 1))``, errors up to 1e24). The
      convolution has stride 1, so dropping input from an edge drops as many outputs there:
      the padding is raised to 0 and the output cropped instead.
    - The group-axis form (kernel 2, stride 2, padding 0 on both sides): one more output on the
      low side, cropped off again.
    """
    risky = _group_window_axes(stride, dilation, lay.kernel)
    pads, crops = [], []
    for r, (lo, hi) in zip(risky, tpads, strict=True):
        crop = [max(0, -lo), max(0, -hi)]
        lo, hi = max(0, lo), max(0, hi)
        if r and (lo, hi) == (0, 0):
            lo, crop[0] = 1, crop[0] + 1
        pads.append((lo, hi))
        crops.append(tuple(crop))
    return tuple(pads), tuple(crops)


def crop(x, axes, amounts):
    """``x`` without the first ``lo`` and the last ``hi`` entries of each of ``axes``, for the
    ``(lo, hi)`` pairs ``amounts``."""
    if not any(lo or hi for lo, hi in amounts):
        return x
    start, stop = [0] * x.ndim, list(x.shape)
    for axis, (lo, hi) in zip(axes, amounts, strict=True):
        start[axis], stop[axis] = lo, x.shape[axis] - hi
    return lax.slice(x, start, stop)

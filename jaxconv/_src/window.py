"""One canonical window spec for every regular pooling op, and its per-axis taps.

A box window is a product of 1-D intervals, so a pooling op is described per spatial axis by an
:class:`AxisPlan` (input length, kernel, stride, dilation, padding, output length). The public
functions build a :class:`WindowSpec` once through :func:`window_spec`, which validates every
argument and raises the user-facing errors; the ops never see a raw argument.

:func:`taps` turns one axis of an array into its ``kernel`` strided slices (tap ``j`` holds, for
each output position ``o``, the input at ``o*stride - lo + j*dilation``), which is how the
separable reductions (max, sum, counts) run one axis at a time.
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.args import check_bool, layout_axes, per_axis, spatial_rank
from jaxconv._src.arithmetic import pool_output_size_1d, resolve_padding


@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """A regular 1-D window plan along array axis ``axis``."""

    axis: int
    size: int
    kernel: int
    stride: int
    dilation: int
    lo: int
    hi: int
    out: int

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    @property
    def extent(self) -> int:
        """Length of the padded input the output windows actually touch."""
        return (self.out - 1) * self.stride + self.span

    @property
    def hi_needed(self) -> int:
        """High-side padding that makes the padded input exactly ``extent`` long (may be < 0)."""
        return self.extent - self.size - self.lo

    # The plan protocol of jaxconv._src.select (``aux`` is unused: regular plans are static).
    def taps(self, x, fill, aux=None):
        return taps(x, self, fill)

    def valid(self, ndim):
        return tap_valid(self, ndim)

    def position(self, offset, aux=None):
        return tap_position(self, offset)


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """Per-axis plans of a pooling op over an array of ``ndim`` axes."""

    plans: tuple[AxisPlan, ...]
    channel_axis: int
    ndim: int
    ceil_mode: bool

    @property
    def n(self) -> int:
        return len(self.plans)

    @property
    def axes(self) -> tuple[int, ...]:
        return tuple(p.axis for p in self.plans)

    @property
    def window_size(self) -> int:
        return math.prod(p.kernel for p in self.plans)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(in_shape)
        for p in self.plans:
            shape[p.axis] = p.out
        return tuple(shape)

    def in_shape(self, out_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(out_shape)
        for p in self.plans:
            shape[p.axis] = p.size
        return tuple(shape)

    def with_leading_axis(self) -> "WindowSpec":
        """The spec of the same op on an array with one more leading (batch) axis."""
        plans = tuple(dataclasses.replace(p, axis=p.axis + 1) for p in self.plans)
        return WindowSpec(plans, self.channel_axis + 1, self.ndim + 1, self.ceil_mode)


def _check_pad_limit(fname, pads, kernel, dilation, pad_limit):
    for (lo, hi), k, d in zip(pads, kernel, dilation, strict=True):
        half = (d * (k - 1) + 1) // 2 if pad_limit == "span" else k // 2
        if max(lo, hi) > half:
            what = "the effective window span d*(k-1)+1" if pad_limit == "span" else "the window"
            raise ValueError(
                f"{fname}: `padding` must be at most half of {what} on every axis "
                f"(at most {half} for kernel {k}, dilation {d}), got ({lo}, {hi})."
            )


def window_spec(
    fname: str,
    shape: tuple[int, ...],
    window,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode=False,
    data_format="channels_last",
    *,
    pad_limit: str = "span",
) -> WindowSpec:
    """Validate pooling arguments against an input ``shape`` and build the canonical spec.

    ``stride=None`` means stride = window (PyTorch's default). ``pad_limit`` is PyTorch's rule
    for the largest padding: "span" (max, Lp: half the dilated span) or "kernel" (avg: half the
    window).
    """
    n = spatial_rank(fname, "window", window)
    kernel = per_axis(fname, "window", window, n)
    strides = kernel if stride is None else per_axis(fname, "stride", stride, n)
    dilation = per_axis(fname, "dilation", dilation, n)
    ceil_mode = check_bool(fname, "ceil_mode", ceil_mode)
    axes, channel_axis = layout_axes(fname, len(shape), n, data_format)
    sizes = tuple(shape[a] for a in axes)
    if any(s < 1 for s in sizes):
        raise ValueError(f"{fname}: spatial sizes of `x` must be >= 1, got {sizes}.")
    pads = resolve_padding(
        fname, padding, n, kernel=kernel, stride=strides, dilation=dilation, in_sizes=sizes
    )
    _check_pad_limit(fname, pads, kernel, dilation, pad_limit)
    plans = []
    for n, row in enumerate(zip(axes, sizes, kernel, strides, dilation, pads, strict=True)):
        a, i, k, s, d, (lo, hi) = row
        out = pool_output_size_1d(fname, i, k, s, (lo, hi), d, ceil_mode, arg="window", axis=n)
        plans.append(AxisPlan(a, i, k, s, d, lo, hi, out))
    return WindowSpec(tuple(plans), channel_axis, len(shape), ceil_mode)


def pad_axis(x: jnp.ndarray, axis: int, lo: int, hi: int, value) -> jnp.ndarray:
    """Pad (or, for negative amounts, crop) ``x`` along one axis with a constant."""
    if lo == 0 and hi == 0:
        return x
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (lo, hi, 0)
    return lax.pad(x, jnp.asarray(value, x.dtype), config)


def taps(x: jnp.ndarray, plan: AxisPlan, fill) -> list[jnp.ndarray]:
    """The ``kernel`` strided slices of ``x`` along ``plan.axis``, each ``plan.out`` long.

    Tap ``j`` at output ``o`` is the padded input at ``o*stride + j*dilation``; padding uses
    ``fill``.
    """
    xp = pad_axis(x, plan.axis, plan.lo, plan.hi_needed, fill)
    stop = (plan.out - 1) * plan.stride + 1
    return [
        lax.slice_in_dim(xp, j * plan.dilation, j * plan.dilation + stop, plan.stride, plan.axis)
        for j in range(plan.kernel)
    ]


def pick_taps(taps, offset):
    """The tap chosen by ``offset`` at each output: ``taps[offset]``, by selects."""
    t = taps[0]
    for j in range(1, len(taps)):
        t = jnp.where(offset == j, taps[j], t)
    return t


def along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A 1-D array shaped to broadcast along ``axis`` of an ``ndim``-axis array."""
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return values.reshape(shape)


def tap_valid(plan: AxisPlan, ndim: int) -> list[np.ndarray | None]:
    """Per tap, where it reads real input (not padding); None where it always does."""
    masks = []
    for j in range(plan.kernel):
        pos = np.arange(plan.out) * plan.stride - plan.lo + j * plan.dilation
        ok = (pos >= 0) & (pos < plan.size)
        masks.append(None if ok.all() else along(ok, plan.axis, ndim))
    return masks


def tap_position(plan: AxisPlan, offset: jnp.ndarray) -> jnp.ndarray:
    """Input coordinate along ``plan.axis`` read by tap ``offset`` of each output position."""
    start = along(np.arange(plan.out) * plan.stride - plan.lo, plan.axis, offset.ndim)
    return jnp.asarray(start, jnp.int32) + offset.astype(jnp.int32) * plan.dilation

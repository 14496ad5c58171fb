"""Adaptive average and max pooling with PyTorch's exact window boundaries.

Output ``i`` of an axis of input length ``In`` and output length ``Out`` reads the input interval
``[floor(i*In/Out), ceil((i+1)*In/Out))`` (PyTorch's ``AdaptivePooling.h``), for any
``In, Out >= 1``. Each spatial axis is an :class:`AdaptivePlan`: static numpy starts and lengths,
``k = max(length)`` taps, tap ``j`` valid where ``j < length``. Its taps are ``k`` strided slices
when the starts are an arithmetic progression (``In % Out == 0``, ``Out == 1`` and cases such as
50 -> 7), otherwise ``k`` gathers with static indices; the program size never depends on the
number of outputs. Max pooling over windows of varying lengths (``Out < In``), and averages over
such windows of more than ``STACKED_MEAN_MIN_KERNEL`` taps, gather all taps at once instead
(:class:`StackedAdaptivePlan`), so that their derivatives do not grow with ``k`` either.

Max reuses the shared selection of :mod:`jaxconv._src.select` (PyTorch's tie rule, flat indices,
the linear ``custom_jvp`` tangent). Windows of one length at a fixed step (arithmetic starts
always have one length) are handed over as a regular :class:`~jaxconv._src.window.AxisPlan`, so
they take the regular windows' paths. CPU timings (2 shared cores, float32 NHWC batch 32 and 64
channels, medians, PyTorch channels_last beside them in the same run): 50 -> 7 forward plus
backward about 2.5 ms (PyTorch about 1.1 ms; this module's own taps measured about 200 ms);
224 -> 7 (32 taps per axis, windows tiling the axis, so select's two-reduction winners) forward
plus backward about 240 ms against PyTorch's 240 ms in one loaded run (it was about 1130 ms in
that run with the tap fold, whose winners XLA re-evaluated inside the gradient's loop).

Average skips ``Out == In`` axes. Where every other axis has windows of one length at a fixed
step (``In % Out == 0``, ``Out == 1``, 50 -> 7), the windows are avg_pool's regular windows
without padding: summed as avg_pool sums them, divided once by the window size (PyTorch's
sum-then-divide), and differentiated through a tangent of reshapes and strided slices
(:func:`_regular_mean`). Otherwise each axis sums its taps under their masks, one axis at a
time (no cumulative sum, which loses precision on long axes), and the sums are divided once by
the window sizes (:func:`_mean_uneven`); where a sum overflows it is redone on the input scaled
by an exact power of two.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxconv._src.argmax import select_max
from jaxconv._src.args import (
    INT32_MAX,
    check_bool,
    check_floating,
    check_index_volume,
    is_int,
    layout_axes,
    spatial_rank,
)
from jaxconv._src.avg import window_mean
from jaxconv._src.boxmap import compute_dtype, safe_mean, tile_sum
from jaxconv._src.linear import adjoint_pair, linear_primitive
from jaxconv._src.window import AxisPlan, WindowSpec, along


@dataclasses.dataclass(frozen=True)
class AdaptivePlan:
    """The adaptive windows of one spatial axis (array axis ``axis``), ``size -> out``."""

    axis: int
    size: int
    out: int

    @property
    def starts(self) -> np.ndarray:
        return (np.arange(self.out, dtype=np.int64) * self.size) // self.out

    @property
    def lengths(self) -> np.ndarray:
        ends = -((-np.arange(1, self.out + 1, dtype=np.int64) * self.size) // self.out)
        return ends - self.starts

    @property
    def kernel(self) -> int:
        return int(self.lengths.max())

    @property
    def stride(self) -> int | None:
        """The common step of the starts when they form an arithmetic progression, else None."""
        if self.out == 1:
            return 1
        steps = np.diff(self.starts)
        return int(steps[0]) if steps[0] > 0 and np.all(steps == steps[0]) else None

    # The plan protocol of jaxconv._src.select (``aux`` is unused: the plan is static).
    def taps(self, x, fill, aux=None) -> list[jax.Array]:
        """Tap ``j``: the input at ``start + j`` for every output (``fill`` past the end)."""
        stride = self.stride
        if stride is not None:
            need = (self.out - 1) * stride + self.kernel - self.size
            xp = _pad_high(x, self.axis, need, fill)
            stop = (self.out - 1) * stride + 1
            return [
                lax.slice_in_dim(xp, j, j + stop, stride, self.axis) for j in range(self.kernel)
            ]
        taps = []
        for j, ok in enumerate(self.valid(x.ndim)):
            tap = jnp.take(
                x,
                jnp.asarray(self.starts + j, jnp.int32),
                axis=self.axis,
                mode="fill",
                unique_indices=self.out <= self.size,
                indices_are_sorted=True,
            )
            taps.append(tap if ok is None else jnp.where(ok, tap, jnp.asarray(fill, x.dtype)))
        return taps

    def valid(self, ndim: int) -> list[np.ndarray | None]:
        lengths = self.lengths
        return [
            None if np.all(lengths > j) else along(lengths > j, self.axis, ndim)
            for j in range(self.kernel)
        ]

    def position(self, offset, aux=None) -> jax.Array:
        start = along(self.starts, self.axis, offset.ndim).astype(np.int32)
        return jnp.asarray(start) + offset.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class StackedAdaptivePlan(AdaptivePlan):
    """Windows of varying lengths (``out < size``) read by one gather of all their taps.

    :meth:`window` stacks every window's taps after the axis (``(..., out, kernel, ...)``) with
    one static-index gather, whose transpose is one scatter-add. Winners and indices reduce
    that stack (``gathered_winners`` in :mod:`jaxconv._src.select`) and the tangent gathers the
    winners (:meth:`pick`), so the derivative's program does not grow with the window length:
    (2, 300, 300, 4) -> 7x7 (44 taps) max pooling's gradient compiled in 0.2 against 10.8 s
    with one gather and one scatter per tap, and ran in 3.2 against 10.5 ms. It is faster for
    few taps too (float32 NHWC batch 32, 64 channels, forward plus backward, interleaved runs):
    56 -> 37 (3 taps) 30 against 107 ms, 60 -> 7 (10 taps) 5.6-10 against 51-71 ms, 100 -> 7
    (16 taps) 90-96 against 191-204 ms; with indices, 50 -> 9 forward 3-4 against 26-32 ms.

    A window shorter than ``kernel`` repeats its last element: the repeats never win a tie, and
    a NaN repeat stands for that element (:meth:`position` maps it back).
    """

    stored_winners = True
    gathered_winners = True

    @property
    def index(self) -> np.ndarray:
        """The ``(out, kernel)`` input positions of the stacked taps."""
        steps = np.minimum(np.arange(self.kernel)[None, :], self.lengths[:, None] - 1)
        return self.starts[:, None] + steps

    def window(self, x, aux=None) -> jax.Array:
        ax, index = self.axis, jnp.asarray(self.index.reshape(-1).astype(np.int32))
        w = jnp.take(x, index, axis=ax, mode="clip", indices_are_sorted=True)
        return w.reshape((*x.shape[:ax], self.out, self.kernel, *x.shape[ax + 1 :]))

    def mask(self, ndim: int) -> np.ndarray:
        """Where the stacked taps lie inside their window, shaped to broadcast against them."""
        inside = np.arange(self.kernel)[None, :] < self.lengths[:, None]
        shape = [1] * (ndim + 1)
        shape[self.axis], shape[self.axis + 1] = inside.shape
        return inside.reshape(shape)

    def position(self, offset, aux=None) -> jax.Array:
        last = along(self.lengths - 1, self.axis, offset.ndim).astype(np.int32)
        return super().position(jnp.minimum(offset.astype(jnp.int32), jnp.asarray(last)))

    def pick(self, t, aux, offset) -> jax.Array:
        """The tangent at the winners: one gather of an element per output, whose transpose
        scatters as many (not ``kernel`` times as many, as the pick from :meth:`window` does):
        float32 (32, 60, 60, 64) -> 7x7 transposed picks 12 against 26-33 ms."""
        return jnp.take_along_axis(t, self.position(offset), self.axis, mode="clip")


# Averages over windows of varying lengths and more taps than this sum one gather of all taps
# (StackedAdaptivePlan). Fewer sum their taps, faster (the adjoint gathers either way,
# _spread): float32 NHWC batch 32, 64 channels, forward, 30 -> 7x7 (5 taps) 0.26 against
# 2.5-3.0 ms, 100 -> 7x7 (16 taps) 2.7 against 10.4 ms. Beyond, taps win or lose by dtype
# ((32, 200, 200, 16) -> 7x7, 30 taps: float32 3.1-3.2 against 7.5-8.6 ms, bfloat16 even; 44
# taps even) and compile twice as long (300 -> 7: 0.45-0.5 against 0.2 s).
STACKED_MEAN_MIN_KERNEL = 16


def _as_regular(plan: AdaptivePlan) -> AdaptivePlan | AxisPlan:
    """Windows of one length at a fixed step are a regular window (no padding): an AxisPlan.
    Other windows are a :class:`StackedAdaptivePlan` where they are fewer than the inputs (each
    input then lies in at most two windows); more (upsampling) keep their taps."""
    lengths = plan.lengths
    if plan.stride is None or np.any(lengths != lengths[0]):
        if plan.out < plan.size:
            return StackedAdaptivePlan(plan.axis, plan.size, plan.out)
        return plan
    stride = plan.size if plan.out == 1 else plan.stride
    return AxisPlan(plan.axis, plan.size, int(lengths[0]), stride, 1, 0, 0, plan.out)


def _pad_high(x, axis, amount, fill):
    if amount <= 0:
        return x
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (0, amount, 0)
    return lax.pad(x, jnp.asarray(fill, x.dtype), config)


def adaptive_plans(fname: str, shape, output_size, data_format) -> tuple[AdaptivePlan, ...]:
    """Validate the arguments and build one plan per spatial axis (``None`` keeps the size)."""
    n = spatial_rank(fname, "output_size", output_size)
    for value in output_size:
        if value is not None and (not is_int(value) or not 1 <= value <= INT32_MAX):
            raise ValueError(
                f"{fname}: `output_size` entries must be ints in [1, {INT32_MAX}] or None, got "
                f"{output_size!r}."
            )
    axes, _ = layout_axes(fname, len(shape), n, data_format)
    sizes = tuple(shape[a] for a in axes)
    if any(s < 1 for s in sizes):
        raise ValueError(f"{fname}: spatial sizes of `x` must be >= 1, got {sizes}.")
    return tuple(
        AdaptivePlan(a, s, s if o is None else int(o))
        for a, s, o in zip(axes, sizes, output_size, strict=True)
    )


def _tiled(plans) -> tuple[AxisPlan, ...]:
    """``In % Out == 0`` axes as regular windows that tile the axis."""
    return tuple(
        AxisPlan(p.axis, p.size, p.size // p.out, p.size // p.out, 1, 0, 0, p.out) for p in plans
    )


def _masked_sum(v, *, plan):
    """Sum along one axis over its windows: the taps under their validity masks, stacked by
    one gather (:class:`StackedAdaptivePlan`) beyond ``STACKED_MEAN_MIN_KERNEL`` taps."""
    if plan.kernel > STACKED_MEAN_MIN_KERNEL:
        stacked = StackedAdaptivePlan(plan.axis, plan.size, plan.out)
        w = stacked.window(v)
        inside = jnp.where(stacked.mask(v.ndim), w, jnp.zeros((), w.dtype))
        return jnp.sum(inside, axis=plan.axis + 1)
    out = None
    for tap, ok in zip(plan.taps(v, 0), plan.valid(v.ndim), strict=True):
        term = tap if ok is None else jnp.where(ok, tap, jnp.zeros((), tap.dtype))
        out = term if out is None else out + term
    return out


def _spread(g, *, plan):
    """The adjoint of :func:`_masked_sum` for ``out < size``: each input lies in the last
    window that starts at or before it and, where windows overlap (by one element at most),
    in the window before; two gathers of ``g``, where JAX's transpose of the taps scatters.
    With the single division of :func:`_mean_uneven`, float32 NHWC batch 32, 64 channels
    (PyTorch channels_last in the same runs): 100 -> 7x7 forward 3.6-3.7 against 13.9-14.5 ms
    before (PyTorch 5.6), forward plus backward 11.3-11.6 against 27-29 ms (12.9); 30 -> 7x7
    0.22 against 1.3-1.4 ms (0.27) and 1.2-1.4 against 3.0-3.2 ms (0.61)."""
    i = np.arange(plan.size)
    last = np.searchsorted(plan.starts, i, side="right") - 1
    before = np.maximum(last - 1, 0)
    shared = (last > 0) & (plan.starts[before] + plan.lengths[before] > i)

    def take(index):
        index = jnp.asarray(index.astype(np.int32))
        return jnp.take(g, index, axis=plan.axis, indices_are_sorted=True, mode="clip")

    inside = along(shared, plan.axis, g.ndim)
    return take(last) + jnp.where(inside, take(before), jnp.zeros((), g.dtype))


def _leading(params):
    plan = params["plan"]
    return {"plan": dataclasses.replace(plan, axis=plan.axis + 1)}


def _resized(shape, *, plan, size):
    return (*shape[: plan.axis], size, *shape[plan.axis + 1 :])


# Windows fewer than the inputs: the sum and its adjoint are linear primitives that transpose
# into each other (:mod:`jaxconv._src.linear`), so forward mode keeps working.
_sum_p = linear_primitive(
    "jaxconv_adaptive_sum",
    _masked_sum,
    lambda shape, plan: _resized(shape, plan=plan, size=plan.out),
    _leading,
)
_spread_p = linear_primitive(
    "jaxconv_adaptive_spread",
    _spread,
    lambda shape, plan: _resized(shape, plan=plan, size=plan.size),
    _leading,
)
adjoint_pair(_sum_p, _spread_p)


def _window_sum(v, plan):
    """:func:`_masked_sum`, as a primitive with the gathers of :func:`_spread` for its adjoint
    where windows are fewer than the inputs (upsampling windows keep JAX's transpose)."""
    if plan.out < plan.size:
        return _sum_p.bind(v, plan=plan)
    return _masked_sum(v, plan=plan)


def _mean_uneven(x, plans):
    """The average over windows of varying lengths on some axes: every axis summed (``In % Out
    == 0`` axes by one reshape and reduction, :func:`~jaxconv._src.boxmap.tile_sum`, the others
    by :func:`_masked_sum`), then divided once by the window sizes, as PyTorch. Dividing axis
    by axis moved 0.1-0.3% of float16/bfloat16 means off PyTorch's by one unit: a sum of
    16-bit values is exact in float32, so a mean often lies exactly halfway between two 16-bit
    numbers, where two roundings decide differently from one."""
    tiled = _tiled(tuple(p for p in plans if p.size % p.out == 0))
    uneven = tuple(p for p in plans if p.size % p.out)

    def total(v):
        v = tile_sum(v, tiled) if tiled else v
        for plan in uneven:
            v = _window_sum(v, plan)
        return v

    dtype = compute_dtype(x.dtype)
    count = jnp.asarray(math.prod(p.kernel for p in tiled), dtype)
    for plan in uneven:  # exact products: sizes below 2^24
        count = count * jnp.asarray(along(plan.lengths, plan.axis, x.ndim), dtype)
    largest = math.prod(p.kernel for p in (*tiled, *uneven))
    return safe_mean(total, x, count, largest)


def _regular_sum(t, plans):
    """Window sums over regular windows without padding (``stride <= kernel``): per axis a
    tiling reshape-and-sum plus ``kernel - stride`` strided slices. Linear, and its transpose
    is broadcasts and edge pads."""
    for p in plans:
        tiled = lax.slice_in_dim(t, 0, p.out * p.stride, 1, p.axis)
        shape = (*tiled.shape[: p.axis], p.out, p.stride, *tiled.shape[p.axis + 1 :])
        total = jnp.sum(tiled.reshape(shape), axis=p.axis + 1)
        for e in range(p.stride, p.kernel):
            total = total + lax.slice_in_dim(t, e, e + (p.out - 1) * p.stride + 1, p.stride, p.axis)
        t = total
    return t


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _regular_mean(x, spec: WindowSpec):
    """The average over windows of one length at a fixed step on every axis (50 -> 7: 8 at
    step 7), computed as avg_pool computes it (:func:`~jaxconv._src.avg.window_mean`: strided
    slices, no rescue pass under ``lax.cond`` unless tiling windows are summed by a reduction).

    The tangent is :func:`_regular_sum`, whose transpose XLA runs fast; the transpose of the
    slices is a sum of interior-padded copies. float32 NHWC (32, 50, 50, 64) -> 7x7, against the
    masked taps under ``lax.cond``: forward 0.3 ms against 0.6-0.8 ms, forward plus backward
    1.1-1.4 ms against 2.3-3.3 ms; 224 -> 7 forward plus backward 27-30 ms against 37-42 ms.
    """
    return window_mean(x, spec, float(spec.window_size))


@_regular_mean.defjvp
def _regular_mean_jvp(spec, primals, tangents):
    t = tangents[0].astype(compute_dtype(tangents[0].dtype))
    tangent = _regular_sum(t, spec.plans) / jnp.asarray(spec.window_size, t.dtype)
    return _regular_mean(primals[0], spec), tangent


def adaptive_avg_pool(
    x: ArrayLike, output_size, *, data_format: str = "channels_last"
) -> jax.Array:
    """Adaptive average pooling over ``n = len(output_size)`` spatial axes, as PyTorch.

    Along each axis of input length ``In`` and output length ``Out``, output ``i`` averages the
    input interval ``[floor(i*In/Out), ceil((i+1)*In/Out))`` (``AdaptiveAvgPool{1,2,3}d``), for
    any ``In, Out >= 1``, including ``Out > In`` and ``In % Out != 0``. The window is the product
    of the per-axis intervals and the divisor its size. float16 and bfloat16 inputs are summed in
    float32 and the result is returned in the input dtype.

    Args:
      x: ``(*batch, *spatial, C)`` for channels_last or ``(*batch, C, *spatial)`` for
        channels_first, a floating dtype.
      output_size: a sequence of ``n`` entries, each an int >= 1 or ``None`` (keep that axis).
      data_format: "channels_last" or "channels_first".

    Returns:
      ``x.shape`` with the spatial sizes replaced by ``output_size``, dtype ``x.dtype``.

    Transformations: ``jit``, ``vmap``, ``grad``/``vjp``, ``jvp`` and higher orders: the op is
    linear in ``x`` (slices, reshapes, static-index gathers and adds).

    Example:
      >>> x = jnp.arange(10.0).reshape(1, 10, 1)
      >>> adaptive_avg_pool(x, (3,))[0, :, 0]
      Array([1.5, 4.5, 7.5], dtype=float32)
    """
    fname = "adaptive_avg_pool"
    x = check_floating(fname, "x", x)
    plans = adaptive_plans(fname, x.shape, output_size, data_format)
    channel = layout_axes(fname, x.ndim, len(plans), data_format)[1]
    plans = tuple(p for p in plans if p.out != p.size)
    regular = tuple(_as_regular(p) for p in plans)
    if regular and all(isinstance(p, AxisPlan) for p in regular):  # 16-bit x: summed in float32
        spec = WindowSpec(regular, channel, x.ndim, False)
        return _regular_mean(x, spec).astype(x.dtype)
    return _mean_uneven(x, plans).astype(x.dtype)


def adaptive_max_pool(
    x: ArrayLike,
    output_size,
    *,
    return_indices: bool = False,
    data_format: str = "channels_last",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Adaptive max pooling over ``n = len(output_size)`` spatial axes, as PyTorch.

    The windows are those of :func:`adaptive_avg_pool`: along each axis, output ``i`` reads
    ``[floor(i*In/Out), ceil((i+1)*In/Out))``. Within a window the first maximum in row-major
    order wins and NaN propagates (the last NaN wins), as in ``AdaptiveMaxPool{1,2,3}d``.

    Args:
      x: ``(*batch, *spatial, C)`` for channels_last or ``(*batch, C, *spatial)`` for
        channels_first, a floating dtype.
      output_size: a sequence of ``n`` entries, each an int >= 1 or ``None`` (keep that axis).
      return_indices: also return the position of every maximum.
      data_format: "channels_last" or "channels_first".

    Returns:
      The pooled array (``x.shape`` with the spatial sizes replaced by ``output_size``, dtype
      ``x.dtype``); with ``return_indices``, also the int32 flat index of each maximum in the
      spatial volume of its (batch, channel), PyTorch's convention (``h*W + w`` in 2-D).

    Transformations: ``jit``, ``vmap``, ``grad``/``vjp``, ``jvp`` and higher orders; the
    derivative sends the cotangent to the selected maximum only, as PyTorch's.

    Example:
      >>> x = jnp.array([[0.0, 3.0, 1.0, 2.0, 5.0]])[..., None]
      >>> adaptive_max_pool(x, (2,))[0, :, 0]
      Array([3., 5.], dtype=float32)
    """
    fname = "adaptive_max_pool"
    x = check_floating(fname, "x", x)
    return_indices = check_bool(fname, "return_indices", return_indices)
    plans = tuple(_as_regular(p) for p in adaptive_plans(fname, x.shape, output_size, data_format))
    check_index_volume(fname, tuple(p.size for p in plans), return_indices)
    return select_max(x, (None,) * len(plans), plans, return_indices)

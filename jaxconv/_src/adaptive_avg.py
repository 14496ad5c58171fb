"""Adaptive average pooling with PyTorch's exact window boundaries (see
:mod:`jaxconv._src.adaptive` for the windows).

Axes with ``Out == In`` are skipped. Where every other axis has windows of one length at a fixed
step (``In % Out == 0``, ``Out == 1``, 50 -> 7), the windows are avg_pool's regular windows
without padding: summed as avg_pool sums them and divided once by the window size (PyTorch's
sum-then-divide). Otherwise each axis sums its taps under their masks, one axis at a time (no
cumulative sum, which loses precision on long axes), and the sums are divided once by the window
sizes (:func:`_uneven_sum`); where a sum overflows it is redone on the input scaled by an exact
power of two (:func:`~jaxconv._src.boxmap.safe_mean`).

The mean and its adjoint are a pair of linear primitives (:mod:`jaxconv._src.linear`); the
adjoint is JAX's transpose of the mean without its rescue (:func:`_adjoint_impl`).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxconv._src.adaptive import AdaptivePlan, StackedAdaptivePlan, _as_regular, adaptive_plans
from jaxconv._src.args import check_floating, layout_axes
from jaxconv._src.avg import window_mean
from jaxconv._src.boxmap import compute_dtype, safe_mean, tile_sum
from jaxconv._src.linear import adjoint_pair, linear_primitive
from jaxconv._src.window import AxisPlan, WindowSpec, along

# Averages over windows of varying lengths and more taps than this sum one gather of all taps
# (StackedAdaptivePlan). Fewer sum their taps, faster (the adjoint gathers either way,
# _spread): float32 NHWC batch 32, 64 channels, forward, 30 -> 7x7 (5 taps) 0.26 against
# 2.5-3.0 ms, 100 -> 7x7 (16 taps) 2.7 against 10.4 ms. Beyond, taps win or lose by dtype
# ((32, 200, 200, 16) -> 7x7, 30 taps: float32 3.1-3.2 against 7.5-8.6 ms, bfloat16 even; 44
# taps even) and compile twice as long (300 -> 7: 0.45-0.5 against 0.2 s).
STACKED_MEAN_MIN_KERNEL = 16


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
    With the single division of :func:`_uneven_sum`'s sums, float32 NHWC batch 32, 64 channels
    (PyTorch channels_last in the same runs): 100 -> 7x7 forward 3.6-3.7 against 13.9-14.5 ms
    before (PyTorch 5.6), forward plus backward 11.3-11.6 against 27-29 ms (12.9); 30 -> 7x7
    0.22 against 1.3-1.4 ms (0.27) and 1.2-1.4 against 3.0-3.2 ms (0.61)."""
    last, before, shared = plan.containing()

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


def _uneven_sum(plans, ndim: int, dtype):
    """The window sums over windows of varying lengths on some axes, their sizes in ``dtype``
    and the largest size: every axis summed (``In % Out
    == 0`` axes by one reshape and reduction, :func:`~jaxconv._src.boxmap.tile_sum`, the others
    by :func:`_masked_sum`), to be divided once by the window sizes, as PyTorch. Dividing axis
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

    count = jnp.asarray(math.prod(p.kernel for p in tiled), dtype)
    for plan in uneven:  # exact products: sizes below 2^24
        count = count * jnp.asarray(along(plan.lengths, plan.axis, ndim), dtype)
    return total, count, math.prod(p.kernel for p in (*tiled, *uneven))


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


@dataclasses.dataclass(frozen=True)
class _Means:
    """The averaged axes (``out != size``) of an array of ``ndim`` axes, channel axis
    ``channel``: the parameters of the mean and adjoint primitives."""

    plans: tuple[AdaptivePlan, ...]
    channel: int
    ndim: int

    def regular(self) -> WindowSpec | None:
        """The windows as avg_pool's regular windows without padding, where every axis has
        windows of one length at a fixed step (``In % Out == 0``, ``Out == 1``, 50 -> 7)."""
        plans = tuple(_as_regular(p) for p in self.plans)
        if all(isinstance(p, AxisPlan) for p in plans):
            return WindowSpec(plans, self.channel, self.ndim, False)
        return None

    def lead(self) -> "_Means":
        """The same means over an array with one more leading axis."""
        plans = tuple(dataclasses.replace(p, axis=p.axis + 1) for p in self.plans)
        return _Means(plans, self.channel + 1, self.ndim + 1)

    def resized(self, shape, sizes: str) -> tuple[int, ...]:
        """``shape`` with every averaged axis set to its ``sizes`` ("out" or "size")."""
        shape = list(shape)
        for p in self.plans:
            shape[p.axis] = getattr(p, sizes)
        return tuple(shape)


def _mean_impl(x, *, means: _Means):
    """The average: regular windows summed as avg_pool sums them
    (:func:`~jaxconv._src.avg.window_mean`: strided slices, no rescue pass under ``lax.cond``
    unless tiling windows are summed by a reduction), others by :func:`_uneven_sum`; then
    divided once by the window size, with the rescue of
    :func:`~jaxconv._src.boxmap.safe_mean` where a sum overflows."""
    spec = means.regular()
    if spec is not None:
        return window_mean(x, spec, float(spec.window_size))
    total, count, largest = _uneven_sum(means.plans, x.ndim, compute_dtype(x.dtype))
    return safe_mean(total, x, count, largest)


def _sums(t, *, means: _Means):
    """The mean without its overflow rescue: linear in ``t`` and free of value-dependent
    control flow, so that JAX transposes it (:func:`_adjoint_impl`)."""
    spec = means.regular()
    if spec is not None:
        return _regular_sum(t, spec.plans) / jnp.asarray(spec.window_size, t.dtype)
    total, count, _ = _uneven_sum(means.plans, t.ndim, t.dtype)
    return total(t) / count


def _adjoint_impl(g, *, means: _Means):
    """The adjoint of the mean: JAX's transpose of :func:`_sums` in the compute dtype. Regular
    windows transpose :func:`_regular_sum` into broadcasts and edge pads (the transpose of
    avg_pool's strided slices is a sum of interior-padded copies: float32 NHWC (32, 50, 50, 64)
    -> 7x7 forward plus backward 1.1-1.4 ms against 2.3-3.3 ms; 224 -> 7 27-30 against 37-42
    ms); other axes transpose their sums into :func:`_spread`'s gathers."""
    dtype = compute_dtype(g.dtype)
    shape = jax.ShapeDtypeStruct(means.resized(g.shape, "size"), dtype)
    (out,) = jax.linear_transpose(functools.partial(_sums, means=means), shape)(g.astype(dtype))
    return out


def _lead_means(params):
    return {"means": params["means"].lead()}


# The mean and its adjoint are linear primitives that transpose into each other
# (:mod:`jaxconv._src.linear`): reverse mode runs the adjoint above, forward mode the mean
# itself, at every order, and ``jax.linear_transpose`` works although the mean's overflow
# rescue is a value-dependent ``lax.cond``.
_mean_p = linear_primitive(
    "jaxconv_adaptive_avg_pool",
    _mean_impl,
    lambda shape, means: means.resized(shape, "out"),
    _lead_means,
)
_adjoint_p = linear_primitive(
    "jaxconv_adaptive_avg_pool_adjoint",
    _adjoint_impl,
    lambda shape, means: means.resized(shape, "size"),
    _lead_means,
)
adjoint_pair(_mean_p, _adjoint_p)


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

    Transformations: ``jit``, ``vmap``, ``grad``/``vjp``, ``jvp``, higher orders and
    ``jax.linear_transpose``: the op is linear in ``x``.

    Example:
      >>> x = jnp.arange(10.0).reshape(1, 10, 1)
      >>> adaptive_avg_pool(x, (3,))[0, :, 0]
      Array([1.5, 4.5, 7.5], dtype=float32)
    """
    fname = "adaptive_avg_pool"
    x = check_floating(fname, "x", x)
    plans = adaptive_plans(fname, x.shape, output_size, data_format)
    channel = layout_axes(fname, x.ndim, len(plans), data_format)[1]
    means = _Means(tuple(p for p in plans if p.out != p.size), channel, x.ndim)
    return _mean_p.bind(x, means=means) if means.plans else x.astype(x.dtype)

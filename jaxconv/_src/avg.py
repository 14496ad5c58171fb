"""Average pooling with PyTorch's exact divisor rules, for any number of spatial axes.

The divisor is separable: a product of per-axis counts, computed with numpy at trace time, so it
costs nothing at run time. The window sum runs over the whole box at once through
:func:`jaxconv._src.boxmap.box_map` (interior outputs from plain strided slices of the input,
the thin borders apart), with the division folded into the same loop; windows of more than
``BOX_LIMIT`` elements are summed one axis at a time instead.

Which path, and why (CPU, jax 0.10.2, float32 NHWC (32, 56, 56, 64), avg 3x3 s1 p1 forward; the
shared 2-core machine was heavily loaded, so per-fusion times from ``jax.profiler`` with one
XLA thread, best of 12): the box path took about 2.2 ms for the interior loop plus 0.6 ms for the
borders; summing the padded per-axis slices of :func:`jaxconv._src.window.taps` took 25-80 ms
(XLA fuses several padded copies into a branchy scalar loop and materialises padded temporaries)
and one 3x3 ``lax.reduce_window`` 34-53 ms (an unvectorised loop). PyTorch channels_last took
about 3 ms in the same runs.

The op and its adjoint are two linear JAX primitives, each the other's transpose and its own
tangent, lowered through the functions here, so every transformation applies. The adjoint of a
window sum is again a window sum of the cotangent, one stride phase of the input at a time
(:func:`jaxconv._src.boxmap.sum_transpose`), which runs at the speed of the forward pass (about
3 ms for the case above), where JAX's own transpose of the slices (a sum of padded copies)
measured 75-180 ms.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxconv._src.args import check_bool, check_floating, is_int
from jaxconv._src.boxmap import (
    box_map,
    compute_dtype,
    safe_mean,
    sum_transpose,
    tile_spread,
    tile_sum,
    tiles,
)
from jaxconv._src.cast import narrow, tap_groups, widen
from jaxconv._src.linear import adjoint_pair, linear_primitive
from jaxconv._src.window import AxisPlan, WindowSpec, window_spec

_FNAME = "avg_pool"
BOX_LIMIT = 27  # window elements summed in one pass; larger windows go one axis at a time


def _axis_counts(plan: AxisPlan, count_include_pad: bool) -> np.ndarray:
    """How many elements of each output window count towards its divisor, along one axis."""
    start = np.arange(plan.out) * plan.stride - plan.lo
    end = start + plan.kernel
    low, high = (-plan.lo, plan.size + plan.hi) if count_include_pad else (0, plan.size)
    return np.minimum(end, high) - np.maximum(start, low)


def divisor(spec: WindowSpec, count_include_pad: bool, divisor_override: int | None):
    """The divisor of every output, as a scalar or a numpy array that broadcasts over the output.

    A product of per-axis counts; a scalar when every window has the same count.
    """
    if divisor_override is not None:
        return float(divisor_override)
    total = np.ones((1,) * spec.ndim)
    for plan in spec.plans:
        counts = _axis_counts(plan, count_include_pad)
        if np.all(counts == counts[0]):
            total = total * float(counts[0])
            continue
        shape = [1] * spec.ndim
        shape[plan.axis] = plan.out
        total = total * counts.reshape(shape)
    return float(total.item()) if total.size == 1 else total


def _add_all(parts: list[jax.Array], _ranges=None) -> jax.Array:
    return functools.reduce(jnp.add, parts)


def _divide(total: jax.Array, div, plans, ranges) -> jax.Array:
    """``total`` divided by the block ``ranges`` of the divisor ``div`` (scalar or numpy)."""
    if not isinstance(div, np.ndarray):
        return total / jnp.asarray(div, total.dtype)
    index = [slice(None)] * div.ndim
    for plan, (start, stop) in zip(plans, ranges, strict=True):
        if div.shape[plan.axis] > 1:
            index[plan.axis] = slice(start, stop)
    return total / jnp.asarray(div[tuple(index)], total.dtype)


def window_mean(x: jax.Array, spec: WindowSpec, div, finish=None) -> jax.Array:
    """The sum of ``x`` over every window (zero padding) divided by ``div``, then ``finish``
    (elementwise, e.g. the rounding to a 16-bit dtype). 16-bit ``x`` is summed in float32.

    Windows of more than ``BOX_LIMIT`` elements that tile the input (kernel == stride, no
    padding) are a reshape and one reduction, redone on scaled input only where a sum
    overflows (:func:`~jaxconv._src.boxmap.safe_mean`); 16-bit input so only for global
    bfloat16 windows (below). Others run over the whole box in one pass (the division folded
    in) when the window has at most ``BOX_LIMIT`` elements, else one axis at a time. (On CPU
    the box pass is faster for small tiling windows: avg 2x2 stride 2 forward on
    float32 NHWC (32, 56, 56, 64) 0.36 ms against 0.98 ms for the reshape; the adjoint of any
    tiling window is the broadcast of :func:`~jaxconv._src.boxmap.tile_spread`, 3-D 2x2x2 on
    (4, 16, 56, 56, 32) forward plus backward 1.8 ms against 7.7 ms.) Otherwise the taps and
    ``div`` are scaled by the same power of two ``2^-e >= 1/window_size``: no partial sum can
    overflow, so the mean of representable values stays representable, and the quotient is
    unchanged (both only change exponent) unless a scaled tap falls below the normal range,
    where XLA's CPU code flushes it to zero (float32 taps under ``2^(e - 126)``: 2^-121 for up
    to 27 taps). The taps are scaled inside the block loops: scaling ``x`` first wrote
    a scaled copy of it when the axes go one at a time (8x8 stride 7 on (32, 50, 50, 64)
    forward: 0.9 ms against 0.3 ms), and 16-bit taps are converted there (:func:`_axis_sums`).
    """
    finish = finish or (lambda v: v)
    converted = compute_dtype(x.dtype) != x.dtype
    tiled = tiles(spec.plans) and spec.window_size > BOX_LIMIT
    if tiled:  # a scalar divisor: no padding read
        total = functools.partial(tile_sum, plans=spec.plans, matmul=not converted)
        reduced = functools.partial(_tiled_mean, total=total, div=div, spec=spec, finish=finish)
        # 16-bit tiling windows go one axis at a time on the CPU (_axis_sums), except global
        # bfloat16 windows: XLA's CPU reduction reads bfloat16 itself (global average on NHWC
        # (32, 7, 7, 2048), the reduction against _axis_sums: bfloat16 0.18 against 0.68 ms,
        # float16 0.59 against 0.19).
        if not converted or (x.dtype == jnp.bfloat16 and all(p.out == 1 for p in spec.plans)):
            return reduced(x)
    scale = 2.0 ** -math.ceil(math.log2(spec.window_size))
    div = div * scale
    if spec.window_size <= BOX_LIMIT:
        inside = _finish_inside(x.dtype)
        x = x.astype(compute_dtype(x.dtype))

        def mean(parts, ranges):
            total = _divide(_add_all(parts), div, spec.plans, ranges)
            return finish(total) if inside else total

        total = box_map(x * jnp.asarray(scale, x.dtype), spec.plans, mean, 0)
        return total if inside else finish(total)

    def by_axis(x):
        return finish(_divide(_axis_sums(x, spec.plans, scale), div, (), ()))

    if tiled:  # GPUs keep the reduction: the same time, compiled in a fraction of the time
        # (bfloat16 adaptive average 224 -> 7 on (32, 224, 224, 64) on an H100: 0.19-0.20 ms
        # either way, compiled in 0.3 against 6.9 s)
        return lax.platform_dependent(x, cpu=by_axis, default=reduced)
    return by_axis(x)


def _tiled_mean(x, total, div, spec, finish):
    return finish(safe_mean(total, x, div, spec.window_size))


def _axis_sums(x: jax.Array, plans, scale: float) -> jax.Array:
    """The window sums of ``x * scale``, one axis at a time, in :func:`compute_dtype`.

    The taps of the first axis are scaled (and 16-bit taps converted) inside its loop. XLA's
    CPU compiler moves a conversion ahead of the slices that read it and writes a float32 copy
    of ``x`` when one loop reads 16 or more of them, so 16-bit taps are summed in groups
    (:func:`~jaxconv._src.cast.tap_groups`), each group through every axis, and the small
    results added
    (bfloat16 224 -> 7 on (32, 224, 224, 64) forward: 8 ms against 21-30 ms for the tiling
    reduction). A single group's first sums are stored (``box_map(..., store=True)``), else XLA
    fuses them into the next axis's loop with the same effect (bfloat16 8x8 stride 7 on
    (32, 50, 50, 64) forward: 0.21-0.23 ms against 0.61-0.66 ms).
    """
    dtype = compute_dtype(x.dtype)
    converted = dtype != x.dtype
    kernel = plans[0].kernel
    groups = tap_groups(kernel) if converted else [(0, kernel)]
    totals = []
    for lo, hi in groups:

        def scaled_sum(parts, _ranges, lo=lo, hi=hi):
            # Scaled by a division: XLA factors a power-of-two product out of a sum (``a*c +
            # b*c`` to ``(a+b)*c``), which overflows.
            return _add_all([p.astype(dtype) / jnp.asarray(1 / scale, dtype) for p in parts[lo:hi]])

        y = box_map(x, plans[:1], scaled_sum, 0, store=converted and len(groups) == 1)
        for plan in plans[1:]:
            y = box_map(y, (plan,), _add_all, 0)
        totals.append(y)
    return _add_all(totals)


def _finish_inside(dtype) -> bool:
    """Whether the rounding to ``dtype`` runs in each block's loop of ``box_map`` rather than
    as a pass of its own over the assembled sums. float16's ``astype`` fuses into the blocks:
    avg 3x3 stride 1 padding 1 on (32, 56, 56, 64) forward 6.8 -> 0.7-0.8 ms, forward plus
    backward 12.4 -> 1.9 ms; 3x3x3 on (4, 16, 56, 56, 32) 37 -> 3-4 ms and 75 -> 7.3 ms.
    bfloat16's rounding on the bits in each block measured 22 against 2 ms forward."""
    return dtype != jnp.bfloat16


def _mean_transpose(g: jax.Array, spec: WindowSpec, div, finish, inside: bool) -> jax.Array:
    """The adjoint of :func:`window_mean`: spread ``g / div`` back over every window, then
    ``finish`` (inside the last sums' loops where ``inside``)."""
    h = _divide(g, div, (), ())
    if tiles(spec.plans):
        return finish(tile_spread(h, spec.plans, [p.size for p in spec.plans]))
    groups = [spec.plans] if spec.window_size <= BOX_LIMIT else [(p,) for p in spec.plans]
    for i, plans in enumerate(reversed(groups)):
        last = inside and i == len(groups) - 1
        h = sum_transpose(h, plans, [p.size for p in plans], finish if last else None)
    return h if inside else finish(h)


# The mean is linear; its adjoint is again a window sum of the cotangent (one stride phase of
# the input at a time), which runs as fast as the forward pass. XLA's own transpose of the
# slices is a sum of padded copies that compiles to slow branchy loops on CPU. float16 and
# bfloat16 are summed in float32 and rounded back by :mod:`jaxconv._src.cast`: float16 inside
# the sums' loops (:func:`_finish_inside`), bfloat16 fused into the sums in 1-D and in strided
# adjoints, after them otherwise. bfloat16 NHWC (32, 56, 56, 64)
# against XLA's conversion, forward / backward ms: 3x3 stride 1 padding 1 1.8-1.9 / 1.8 against
# 6.3 / 5.8, 3x3 stride 2 padding 1 0.6-0.9 / 0.6 against 1.3 / 0.5; 3-D 3x3x3 stride 1 padding
# 1 on (4, 16, 56, 56, 32) 4.4 / 4.6 against 41 / 40; 1-D k3 stride 2 on (64, 4096, 256) 5.6-5.8
# / 6.3 against 8.1 / 8.1 (rounding after the sums there: 9.1-9.4 / 15-20).
def _mean_impl(x, *, spec: WindowSpec, count_include_pad: bool, divisor_override):
    div = divisor(spec, count_include_pad, divisor_override)
    finish = functools.partial(narrow, dtype=x.dtype, fuse=spec.n == 1)
    return window_mean(x, spec, div, finish)


def _adjoint_impl(g, *, spec: WindowSpec, count_include_pad: bool, divisor_override):
    div = divisor(spec, count_include_pad, divisor_override)
    fuse = spec.n == 1 or any(p.stride > 1 for p in spec.plans)
    finish = functools.partial(narrow, dtype=g.dtype, fuse=fuse)
    return _mean_transpose(widen(g), spec, div, finish, _finish_inside(g.dtype))


def _leading(params):
    return {**params, "spec": params["spec"].with_leading_axis()}


# The mean and its adjoint are linear primitives that transpose into each other
# (:mod:`jaxconv._src.linear`): reverse mode runs the fast adjoint above, forward mode the mean
# itself, at every order (jvp, jax.hessian, jax.linear_transpose and grad of grad).
_mean_p = linear_primitive(
    "jaxconv_avg_pool", _mean_impl, lambda shape, spec, **_: spec.out_shape(shape), _leading
)
_adjoint_p = linear_primitive(
    "jaxconv_avg_pool_adjoint",
    _adjoint_impl,
    lambda shape, spec, **_: spec.in_shape(shape),
    _leading,
)
adjoint_pair(_mean_p, _adjoint_p)


def _check_divisor_override(value) -> int | None:
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise ValueError(
            f"{_FNAME}: `divisor_override` must be None or a positive int, got {value!r}."
        )
    return int(value)


def avg_pool(
    x: ArrayLike,
    window,
    stride=None,
    padding=0,
    *,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    data_format: str = "channels_last",
) -> jax.Array:
    """Average pooling over ``n = len(window)`` spatial axes, with PyTorch's semantics.

    Output ``o`` along an axis averages the window ``[o*s - lo, o*s - lo + k)`` of the input
    padded with zeros. The divisor is the part of the window inside ``[-lo, in + hi)`` when
    ``count_include_pad`` (so the overhang of ``ceil_mode`` is never counted), the part inside
    ``[0, in)`` otherwise, or ``divisor_override`` when given. float16 and bfloat16 inputs are
    summed in float32 and the result is returned in the input dtype.

    Args:
      x: ``(*batch, *spatial, C)`` for channels_last or ``(*batch, C, *spatial)`` for
        channels_first, a floating dtype.
      window: the window size per spatial axis, a sequence of ``n`` ints.
      stride: an int or ``n`` ints; ``None`` means ``window``.
      padding: an int, ``n`` ints, ``n`` ``(lo, hi)`` pairs, "VALID" or "SAME"; at most half
        the window on every side (PyTorch's rule).
      ceil_mode: round the output size up (the last window must start inside the input or
        the left padding).
      count_include_pad: count the padding in the divisor.
      divisor_override: a positive int that replaces the divisor.
      data_format: "channels_last" or "channels_first".

    Returns:
      The pooled array, shape ``x.shape`` with each spatial size ``in`` replaced by
      ``floor((in + lo + hi - k + (s - 1 if ceil_mode else 0)) / s) + 1`` (see
      :func:`jaxconv.conv_output_size`), dtype ``x.dtype``.

    One rule for every number of spatial axes: a window may overhang the input in ceil mode
    (as ``avg_pool1d``/``avg_pool2d`` allow); PyTorch's ``avg_pool3d`` alone rejects an input
    smaller than the window.

    The average of finite values is finite: no partial sum overflows (PyTorch's float32 sum
    gives ``inf`` for a 3x3 window of ``3e38``), because the taps are scaled by a power of two
    ``2^-e <= 1/k`` (``k`` the window size) before they are added. The cost is at the bottom of
    the range, on the CPU, whose compiled code flushes subnormal numbers to zero: a tap smaller
    than ``2^e`` times the smallest normal number (float32 and bfloat16: ``2^(e-126)``,
    ``1.9e-37`` for a 3x3 window) may count as zero, an absolute error of at most that.

    Transformations: ``jit``, ``vmap``, ``grad``/``vjp``, ``jvp`` and higher orders (``jacfwd``,
    ``jax.hessian``), ``jax.linear_transpose``: the op is linear in ``x``, its tangent is the
    average of the tangent and its transpose a window sum of the cotangent as fast as itself.

    Example:
      >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
      >>> avg_pool(x, (2, 2))[0, ..., 0]
      Array([[ 2.5,  4.5],
             [10.5, 12.5]], dtype=float32)
    """
    x = check_floating(_FNAME, "x", x)
    count_include_pad = check_bool(_FNAME, "count_include_pad", count_include_pad)
    divisor_override = _check_divisor_override(divisor_override)
    spec = window_spec(
        _FNAME, x.shape, window, stride, padding, 1, ceil_mode, data_format, pad_limit="kernel"
    )
    return _mean_p.bind(
        x, spec=spec, count_include_pad=count_include_pad, divisor_override=divisor_override
    )

"""Evaluate a function of the window taps over a box window, interior and borders apart.

``box_map(x, plans, fn, fill)`` returns ``fn(taps)`` at every output position, where ``taps`` lists
the window's elements (one array per element of the box, row-major) as output-shaped arrays.

Why not pad the input and slice: on CPU, XLA compiles a fused loop that reads several padded or
shifted copies of an array into scalar code with a branch per element (measured 10-20x slower
than the same loop on unpadded slices), and it materialises padded intermediates as temporaries.
So each axis's outputs are split into a low border, an interior whose windows lie inside the input
and a high border. The interior block (almost every output) reads plain strided slices of ``x``
and fuses into one vectorised loop; the thin border blocks read small zero-padded slabs; the
blocks are written into the output with ``dynamic_update_slice`` (in place).
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.window import AxisPlan, taps


def _segments(plan: AxisPlan) -> list[tuple[int, int]]:
    """Output ranges ``[start, stop)``: low border, interior (windows inside the input), high."""
    first = -(-plan.lo // plan.stride)  # first output whose window starts at >= 0
    last_fit = plan.size - 1 + plan.lo - plan.dilation * (plan.kernel - 1)
    stop = last_fit // plan.stride + 1 if last_fit >= 0 else 0
    first, stop = min(first, plan.out), min(stop, plan.out)
    if first >= stop:
        return [(0, plan.out)]
    return [(a, b) for a, b in ((0, first), (first, stop), (stop, plan.out)) if a < b]


def _runs(plan: AxisPlan) -> list[tuple[int, int]]:
    """Maximal output ranges ``[start, stop)`` whose windows read the same taps of real input."""
    runs: list[list] = []
    for o in range(plan.out):
        pos = o * plan.stride - plan.lo + np.arange(plan.kernel) * plan.dilation
        valid = tuple(np.flatnonzero((pos >= 0) & (pos < plan.size)))
        if runs and runs[-1][2] == valid:
            runs[-1][1] = o + 1
        else:
            runs.append([o, o + 1, valid])
    return [(start, stop) for start, stop, _ in runs]


def _sparse_block(x, plans, ranges, fn):
    """``fn`` over a block of :func:`_runs`: real taps as strided slices, padding taps None."""
    per_axis = []
    for plan, (start, stop) in zip(plans, ranges, strict=True):
        firsts = [start * plan.stride - plan.lo + j * plan.dilation for j in range(plan.kernel)]
        last = (stop - start - 1) * plan.stride
        per_axis.append([f if f >= 0 and f + last < plan.size else None for f in firsts])
    parts = []
    for combo in itertools.product(*per_axis):
        if any(f is None for f in combo):
            parts.append(None)
            continue
        starts, limits, strides = [0] * x.ndim, list(x.shape), [1] * x.ndim
        for plan, (start, stop), first in zip(plans, ranges, combo, strict=True):
            starts[plan.axis], strides[plan.axis] = first, plan.stride
            limits[plan.axis] = first + (stop - start - 1) * plan.stride + 1
        parts.append(lax.slice(x, starts, limits, strides))
    return fn(parts, ranges)


def _sub_plan(plan: AxisPlan, start: int, stop: int) -> tuple[AxisPlan, int, int]:
    """The plan of outputs ``[start, stop)`` over the input slab it reads, and that slab."""
    begin = start * plan.stride - plan.lo
    end = (stop - 1) * plan.stride - plan.lo + plan.dilation * (plan.kernel - 1) + 1
    lo_in, hi_in = max(begin, 0), min(end, plan.size)
    sub = AxisPlan(
        plan.axis,
        hi_in - lo_in,
        plan.kernel,
        plan.stride,
        plan.dilation,
        lo_in - begin,
        end - hi_in,
        stop - start,
    )
    return sub, lo_in, hi_in


def box_taps(x: jax.Array, plans, fill) -> list[jax.Array]:
    """Every element of the box window as an output-shaped array (row-major over ``plans``)."""
    parts = [x]
    for plan in plans:
        parts = [t for p in parts for t in taps(p, plan, fill)]
    return parts


def _block(x, plans, ranges, fn, fill):
    """``fn`` over one block of outputs; ``x`` is an array or a tuple of same-shaped arrays."""
    arrays = x if isinstance(x, tuple) else (x,)
    subs = []
    for plan, (start, stop) in zip(plans, ranges, strict=True):
        sub, lo_in, hi_in = _sub_plan(plan, start, stop)
        arrays = tuple(lax.slice_in_dim(a, lo_in, hi_in, 1, plan.axis) for a in arrays)
        subs.append(sub)
    parts = [box_taps(a, subs, fill) for a in arrays]
    return fn(list(zip(*parts, strict=True)) if isinstance(x, tuple) else parts[0], ranges)


def box_map(x: jax.Array, plans, fn, fill, *, sparse: bool = False, store: bool = False):
    """``fn(box_taps)`` at every output, the interior on plain slices, the borders apart.

    ``fn(parts, ranges)`` maps the taps of a block of outputs to that block, elementwise;
    ``ranges`` gives the block's output range ``(start, stop)`` along each plan's axis. ``x`` may
    be a tuple of same-shaped arrays; then each part is the tuple of their taps.

    ``sparse`` (``x`` one array): the borders are split further into blocks whose windows read
    the same taps, and a tap that reads padding is None in ``parts`` instead of a slice of a
    padded slab, so ``fn`` can tell padding from input (the max's winner must never be padding,
    not even against an input of -inf); ``fill`` is unused. It runs as fast as the padded
    borders (max 3x3 stride 2 padding 1 on (32, 56, 56, 64): 0.54 against 0.55-0.61 ms).

    ``store``: the result is always assembled with ``dynamic_update_slice`` (a single block is
    split in two), which XLA stores; otherwise it may fuse ``fn`` into a consumer that reads each
    output several times and evaluate it again for every read.
    """
    per_axis = [(_runs if sparse else _segments)(plan) for plan in plans]
    if store and all(len(s) == 1 for s in per_axis) and plans[0].out > 1:
        per_axis[0] = [(0, 1), (1, plans[0].out)]
    if sparse:
        blocks = [(r, _sparse_block(x, plans, r, fn)) for r in itertools.product(*per_axis)]
    else:
        blocks = [(r, _block(x, plans, r, fn, fill)) for r in itertools.product(*per_axis)]
    if len(blocks) == 1:
        return blocks[0][1]
    shape = list(blocks[0][1].shape)
    for plan in plans:
        shape[plan.axis] = plan.out
    out = jnp.zeros(shape, blocks[0][1].dtype)
    # The largest block first: XLA writes it together with the zeros around it in one pass;
    # written last, the interior costs a second pass over the output (avg 3x3 stride 1 padding 1
    # forward on (32, 56, 56, 64): 1.3 ms against 3.3 ms).
    for ranges, block in sorted(blocks, key=lambda b: -b[1].size):
        starts = [0] * block.ndim
        for plan, (start, _) in zip(plans, ranges, strict=True):
            starts[plan.axis] = start
        out = lax.dynamic_update_slice(out, block, starts)
    return out


def block_of(x: jax.Array, plans, ranges) -> jax.Array:
    """The block ``ranges`` (one ``(start, stop)`` per plan) of ``x`` along the plans' axes."""
    for plan, (start, stop) in zip(plans, ranges, strict=True):
        x = lax.slice_in_dim(x, start, stop, 1, plan.axis)
    return x


def _phase(plan: AxisPlan, size: int, r: int):
    """Inputs ``i = r (mod stride)`` as a window over the outputs that read them.

    Returns ``(crop, sub_plan)``: input ``r + stride*a`` is read by outputs
    ``a + crop - sub_plan.lo + t*sub_plan.dilation``; ``sub_plan`` is None where no output reads
    these inputs.
    """
    s, d, lo = plan.stride, plan.dilation, plan.lo
    count = -(-(size - r) // s)
    offsets = [(r + lo - j * d) // s for j in range(plan.kernel) if (r + lo - j * d) % s == 0]
    if not offsets:
        return 0, None, count
    e_min, kernel = min(offsets), len(offsets)
    step = (max(offsets) - e_min) // (kernel - 1) if kernel > 1 else 1
    crop = max(e_min, 0)
    length = plan.out - crop
    if length < 1:
        return 0, None, count
    pad_lo = crop - e_min
    hi = (count - 1) + step * (kernel - 1) + 1 - length - pad_lo
    return crop, AxisPlan(plan.axis, length, kernel, 1, step, pad_lo, hi, count), count


def _interleave(parts, axis: int, size: int, stride: int) -> jax.Array:
    """Phase arrays (phase ``r`` holds inputs ``r, r + stride, ...``) woven back into ``size``."""
    if stride == 1:
        return parts[0]
    full = -(-size // stride)
    padded = []
    for part in parts:
        config = [(0, 0, 0)] * part.ndim
        config[axis] = (0, full - part.shape[axis], 0)
        padded.append(lax.pad(part, jnp.zeros((), part.dtype), config))
    woven = jnp.stack(padded, axis + 1)
    shape = list(parts[0].shape)
    shape[axis] = full * stride
    return lax.slice_in_dim(woven.reshape(shape), 0, size, 1, axis)


def adjoint_map(h, plans, sizes, fn, extras=()) -> jax.Array:
    """``fn(parts, extra_blocks)`` at every *input* position, over the windows that read it.

    ``h`` is output-shaped on the plans' axes (or a tuple of such arrays); ``extras`` are
    input-shaped arrays handed to ``fn`` block by block. At input position ``i`` the parts hold
    ``h`` of every output whose window reads ``i``. Inputs are taken one stride phase at a time
    (``i = r (mod stride)`` on each axis), where those outputs form a regular window over ``h``
    at stride 1, and the phases are interleaved at the end: no dilated copy of ``h``.
    ``sizes`` are the input lengths along the plans' axes.
    """
    arrays = h if isinstance(h, tuple) else (h,)
    phases = [
        [_phase(p, n, r) for r in range(min(p.stride, n))]
        for p, n in zip(plans, sizes, strict=True)
    ]
    results, unread = {}, {}
    for combo in itertools.product(*(range(len(ph)) for ph in phases)):
        chosen = [ph[r] for ph, r in zip(phases, combo, strict=True)]
        views, xs = list(arrays), list(extras)
        for plan, size, r, (crop, _, _) in zip(plans, sizes, combo, chosen, strict=True):
            views = [lax.slice_in_dim(v, crop, plan.out, 1, plan.axis) for v in views]
            xs = [lax.slice_in_dim(e, r, size, plan.stride, plan.axis) for e in xs]
        sub = [c[1] for c in chosen]
        if any(p is None for p in sub):
            shape = list(arrays[0].shape)
            for plan, c in zip(plans, chosen, strict=True):
                shape[plan.axis] = c[2]
            unread[combo] = shape  # phases no window reads (stride > window)
            continue

        def block_fn(parts, ranges, sub=sub, xs=xs):
            return fn(parts, [block_of(e, sub, ranges) for e in xs])

        source = tuple(views) if isinstance(h, tuple) else views[0]
        results[combo] = box_map(source, sub, block_fn, 0)
    dtype = next(iter(results.values())).dtype if results else arrays[0].dtype
    results.update({combo: jnp.zeros(shape, dtype) for combo, shape in unread.items()})
    return _weave(results, plans, sizes, phases, ())


def _weave(results, plans, sizes, phases, prefix):
    level = len(prefix)
    if level == len(plans):
        return results[prefix]
    parts = [_weave(results, plans, sizes, phases, (*prefix, r)) for r in range(len(phases[level]))]
    plan = plans[level]
    return _interleave(parts, plan.axis, sizes[level], min(plan.stride, sizes[level]))


def sum_transpose(h: jax.Array, plans, sizes, finish=None) -> jax.Array:
    """The adjoint of the box-window sum ``box_map(x, plans, sum, 0)``, applied to ``h``.

    Input position ``i`` receives the sum of ``h`` over every output whose window reads it
    (:func:`adjoint_map`). ``sizes`` are the input lengths along the plans' axes. ``finish``
    (elementwise) is applied to each block's sums inside its loop.
    """
    finish = finish or (lambda v: v)
    return adjoint_map(h, plans, sizes, lambda parts, _: finish(functools.reduce(jnp.add, parts)))


def tiles(plans) -> bool:
    """Whether the windows tile the input: kernel == stride, no dilation, no padding read."""
    return all(
        p.kernel == p.stride and p.dilation == 1 and p.lo == 0 and p.out * p.kernel <= p.size
        for p in plans
    )


def tile_sum(x: jax.Array, plans, matmul: bool = False) -> jax.Array:
    """The window sums of tiling windows (:func:`tiles`): a crop, a reshape, one reduction.

    ``matmul``: where one window covers whole contiguous axes that have more elements after
    them (global pooling in channels_last), the CPU sums it as a batched product with ones
    instead, which XLA runs faster than a reduction over middle axes. float32 NHWC average
    7x7 -> 1: (32, 7, 7, 64) 0.020 against 0.050 ms, (32, 7, 7, 2048) 0.09-0.11 against
    0.12-0.13 ms; float64 alike. Not for 16-bit input converted to float32 (0.5 against 0.11
    ms), nor channels_first (no gain).
    """
    limits = list(x.shape)
    for p in plans:
        limits[p.axis] = p.out * p.kernel
    x = lax.slice(x, [0] * x.ndim, limits)
    if matmul and _whole_middle_axes(x, plans):
        return lax.platform_dependent(
            x,
            cpu=functools.partial(_ones_product, plans=plans),
            default=functools.partial(_tile_reduce, plans=plans),
        )
    return _tile_reduce(x, plans)


def _tile_reduce(x, plans):
    kernel = {p.axis: p.kernel for p in plans}
    shape, reduce_axes = [], []
    for axis, size in enumerate(x.shape):
        if axis in kernel:
            shape.extend((size // kernel[axis], kernel[axis]))
            reduce_axes.append(len(shape) - 1)
        else:
            shape.append(size)
    return jnp.sum(x.reshape(shape), axis=tuple(reduce_axes))


def _whole_middle_axes(x, plans) -> bool:
    axes = sorted(p.axis for p in plans)
    return (
        all(p.out == 1 for p in plans)
        and axes == list(range(axes[0], axes[-1] + 1))
        and np.prod(x.shape[axes[-1] + 1 :]) > 1
    )


def _ones_product(x, plans):
    """:func:`_tile_reduce` for windows over whole middle axes: ``(pre, S, post)`` times ones."""
    first, last = min(p.axis for p in plans), max(p.axis for p in plans)
    pre, size = math.prod(x.shape[:first]), math.prod(x.shape[first : last + 1])
    v = x.reshape(pre, size, math.prod(x.shape[last + 1 :]))
    ones = jnp.ones((pre, 1, size), x.dtype)
    dims = (((2,), (1,)), ((0,), (0,)))
    total = lax.dot_general(ones, v, dims, precision=lax.Precision.HIGHEST)
    return total.reshape([1 if first <= a <= last else n for a, n in enumerate(x.shape)])


def window_shapes(shape, kernel: dict) -> tuple[list[int], list[int]]:
    """``shape`` with a window axis after each axis in ``kernel`` (``{axis: k}``): of size 1
    (to broadcast from) and of size ``k``."""
    expanded, wide = [], []
    for axis, size in enumerate(shape):
        expanded.append(size)
        wide.append(size)
        if axis in kernel:
            expanded.append(1)
            wide.append(kernel[axis])
    return expanded, wide


def tile_spread(h: jax.Array, plans, sizes) -> jax.Array:
    """The adjoint of :func:`tile_sum`: every output's value over its window, zero elsewhere."""
    kernel = {p.axis: p.kernel for p in plans}
    expanded, wide = window_shapes(h.shape, kernel)
    tiled = [size * kernel.get(axis, 1) for axis, size in enumerate(h.shape)]
    h = jnp.broadcast_to(h.reshape(expanded), wide).reshape(tiled)
    pads = [(0, 0, 0)] * h.ndim
    for p, size in zip(plans, sizes, strict=True):
        pads[p.axis] = (0, size - p.out * p.kernel, 0)
    return lax.pad(h, jnp.zeros((), h.dtype), pads)


def compute_dtype(dtype):
    """float32 for float16 and bfloat16 (sums run in float32), else ``dtype``."""
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def may_overflow(dtype, count: int) -> bool:
    """Whether a sum of ``count`` values of ``dtype`` can overflow its :func:`compute_dtype`
    (not for float16, whose sums run in float32)."""
    return float(jnp.finfo(dtype).max) * count > float(jnp.finfo(compute_dtype(dtype)).max)


def safe_mean(total, x, count, largest: int):
    """``total(x) / count``, as PyTorch (sum, then divide), without overflow where the mean is
    finite: where the sum overflows, the sum of ``x * 2**-e`` (``2**e >= largest``, an exact
    scaling) is divided and scaled back; that second pass runs only when the means do not sum
    to a finite number.

    16-bit ``x`` is summed in float32, converted inside each pass: XLA then fuses the
    conversion into the reduction, where a converted ``x`` handed to the rescue branch was
    written out first (bfloat16 average 7x7 on (32, 7, 7, 2048): 0.13-0.15 against 0.66-0.85 ms).
    """
    dtype = compute_dtype(x.dtype)
    mean = total(x.astype(dtype)) / jnp.asarray(count, dtype)
    scale = 2.0 ** int(np.ceil(np.log2(max(largest, 1))))
    if not may_overflow(x.dtype, largest):
        return mean

    def rescue(mean, x):
        scaled = total(x.astype(dtype) * jnp.asarray(1 / scale, dtype)) / jnp.asarray(count, dtype)
        scaled = scaled * jnp.asarray(scale, dtype)
        # +inf and -inf partial sums give NaN: rescued too where the scaled mean is finite
        return jnp.where(~jnp.isfinite(mean) & jnp.isfinite(scaled), scaled, mean)

    # Runs when some mean is infinite (an overflow, or an infinite input), and harmlessly when
    # the check's own sum overflows or meets a NaN. The sum to a scalar is cheaper than
    # `any(isinf)`: (32, 7, 7, 2048) -> 1x1 float32 0.12 against 0.14 ms in all.
    return lax.cond(~jnp.isfinite(jnp.sum(mean)), rescue, lambda mean, x: mean, mean, x)

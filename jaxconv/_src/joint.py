"""The max-pool derivative over all spatial axes at once, for regular windows.

The per-axis derivative of :mod:`jaxconv._src.select` keeps one offset per axis and picks the
tangent one axis at a time; its transpose builds the cotangent of every intermediate axis.
Here the winner of a whole window is one flat tap index (row-major over the window, int8 up to
127 taps), found after the forward pass by comparing each tap with the pooled value, and the
tangent pick reads every tap once:

- :func:`joint_max`: the max and the winners come from
  :func:`jaxconv._src.boxmap.box_map` (interior outputs from plain strided slices, the thin
  borders apart). The winner is the first tap equal to the maximum, or, where the maximum is
  NaN, the last NaN tap, padding never: PyTorch's tie rule.
- :func:`joint_pick`: every spatial axis is reshaped to ``(blocks, stride)``, so tap ``j`` of
  output ``o`` is block ``o + shift`` at phase ``r``: a unit slice. Its transpose, the gradient,
  is one loop of selects and edge pads over the input (no interior padding, no scatter), so it
  is bitwise reproducible and forward mode still works. Where windows overlap on two or more
  strided axes, the phases are split apart first: the gradient is then a concatenate, and each
  input element evaluates only the taps of its own phase.
- Windows that tile the input (stride equal to the window, no padding or dilation) pick from
  the input reshaped to ``(..., out, kernel, ...)``, one select against each element's tap
  index, as a pair of linear primitives (:mod:`jaxconv._src.linear`): the gradient selects
  every element's window cotangent in one pass from offsets written out once, where the
  transpose of the unit slices evaluated one edge pad per tap at every element. Forward plus
  backward, NHWC, medians of 15 calls in two alternating runs on a 2-core machine whose memory
  moved 10 GB/s, against the unit slices: 2x2x2 stride 2 on (4, 16, 56, 56, 32) float32
  4.6-7.6 against 9.0-10.2 ms, bfloat16 3.3-4.1 against 7.7-8.9; 2x2 stride 2 on
  (32, 112, 112, 64) 20.1-20.8 against 21.7-23.3 and 12.6-13.6 against 18.0-21.1; 3x3 stride 3
  on (32, 56, 56, 64) 5.0-5.2 against 7.8-8.3 and 4.3-4.4 against 4.5-7.4.

On (32, 56, 56, 64) float32 NHWC, max 3x3 stride 2 padding 1, the offsets measured about 0.5 ms
against about 2.5 ms for the per-axis variadic reductions, and the gradient about 0.7 ms against
about 1.9 ms for the per-axis pick.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.boxmap import box_map, tiles, window_shapes
from jaxconv._src.flat_pick import pick_pair
from jaxconv._src.linear import unsigned_zero_cotangent, unsigned_zeros
from jaxconv._src.order import is_nan
from jaxconv._src.window import AxisPlan, tap_position

# Windows of more taps keep the per-axis derivative: the joint pick visits every tap for every
# input element. Measured forward+backward, float32 NHWC, against the per-axis derivative:
# 2x2 stride 1 on (16, 56, 56, 64) 4.0 against 11.1 ms, 3x3 stride 1 padding 1 even (24 ms),
# 5x5 stride 1 padding 2 73 against 51-64 ms, 3x3x3 stride 2 padding 1 on (4, 16, 56, 56, 32)
# 14-16 against 10.5-10.9 ms.
JOINT_MAX_TAPS = 9


def use_joint(plans) -> bool:
    """Whether regular ``plans`` take the joint derivative."""
    if not all(isinstance(p, AxisPlan) for p in plans):
        return False
    return int(np.prod([p.kernel for p in plans])) <= JOINT_MAX_TAPS


def _flat_dtype(taps: int):
    return jnp.int8 if taps <= 127 else jnp.int16 if taps <= 32767 else jnp.int32


def _winners(parts, dtype):
    """The flat tap index of each window's winner in one sparse block of :func:`box_map`
    (padding taps are None; at least one is not): the first maximum, or where a tap is NaN the
    last NaN tap.

    On the CPU one fold keeps the running winner and its tap (:func:`_running_winner`). On
    GPUs that fold made XLA store the running value between fusions: max 3x3 stride 2
    padding 1 on (32, 56, 56, 64) float32 forward plus backward took 0.37 ms on an H100,
    against 0.17 ms for a max first and the first tap equal to it (:func:`_first_equal`).
    """
    real = [(j, part) for j, part in enumerate(parts) if part is not None]
    taps, arrays = [j for j, _ in real], [part for _, part in real]
    kw = {"taps": taps, "dtype": dtype}
    first = lax.platform_dependent(
        *arrays,
        cpu=functools.partial(_running_winner, **kw),
        default=functools.partial(_first_equal, **kw),
    )
    last_nan = jnp.full(first.shape, -1, dtype)
    for j, part in real:
        last_nan = jnp.where(is_nan(part), jnp.asarray(j, dtype), last_nan)
    return jnp.where(last_nan >= 0, last_nan, first)


def _running_winner(*arrays, taps, dtype):
    """A tap replaces the running winner only when strictly larger, so the first maximum
    wins, and a NaN tap never does (a compare and two selects per tap; ``lax.max`` costs three
    instructions for the value alone). The offsets of max 3x3 stride 2 padding 1 on
    (32, 112, 112, 64) float32 measured 3.9-4.0 ms on the CPU, against 4.8-4.9 ms for
    :func:`_first_equal` (5.4 ms with ``lax.max``)."""
    value, first = arrays[0], jnp.full(arrays[0].shape, taps[0], dtype)
    for j, part in zip(taps[1:], arrays[1:], strict=True):
        win = part > value
        first = jnp.where(win, jnp.asarray(j, dtype), first)
        value = jnp.where(win, part, value)
    return first


def _first_equal(*arrays, taps, dtype):
    """A max without NaN propagation (the true max wherever no tap is NaN), then the first tap
    equal to it."""
    value = functools.reduce(lambda a, b: jnp.where(b > a, b, a), arrays)
    first = jnp.full(value.shape, taps[-1], dtype)
    for j, part in zip(reversed(taps[:-1]), reversed(arrays[:-1]), strict=True):
        first = jnp.where(part == value, jnp.asarray(j, dtype), first)
    return first


def joint_max(x, plans, offsets: bool = True, fill=-jnp.inf):
    """The max over every window and, with ``offsets``, per output the row-major flat tap index
    of its winner (PyTorch's tie rule; else None): the first tap equal to the max, or where the
    max is NaN the last NaN tap, padding never. Windows that read padding only hold ``fill``.

    Both come from :func:`jaxconv._src.boxmap.box_map` (strided slices, no padding read). The
    offsets are stored: fused into the gradient's loop, XLA would evaluate the compares again
    for every tap of every input element (max 2x2x2 stride 2 on (4, 16, 56, 56, 32) forward plus
    backward: 13 ms against 2.6 ms).
    """
    shape = list(x.shape)
    for plan in plans:
        shape[plan.axis] = plan.out

    def maximum(parts, ranges):
        real = [part for part in parts if part is not None]
        if not real:
            return jnp.full(_block_shape(shape, plans, ranges), fill, x.dtype)
        return functools.reduce(lax.max, real)

    value = box_map(x, plans, maximum, None, sparse=True)
    if not offsets:
        return value, None
    dtype = _flat_dtype(int(np.prod([p.kernel for p in plans])))

    def winners(parts, ranges):
        if all(part is None for part in parts):  # padding only: tap 0 has a zero tangent
            return jnp.zeros(_block_shape(shape, plans, ranges), dtype)
        return _winners(parts, dtype)

    return value, box_map(x, plans, winners, None, sparse=True, store=True)


def _block_shape(shape, plans, ranges):
    block = list(shape)
    for plan, (start, stop) in zip(plans, ranges, strict=True):
        block[plan.axis] = stop - start
    return block


def joint_index(offsets, plans, sizes):
    """PyTorch's flat index (int32, row-major over the unpadded spatial ``sizes``) of each
    winner given by its flat tap ``offsets``."""
    rest = offsets.astype(jnp.int32)
    index, scale = None, 1
    for plan, size in zip(reversed(plans), reversed(sizes), strict=True):
        rest, j = jnp.divmod(rest, plan.kernel)
        term = tap_position(plan, j) * scale
        index = term if index is None else index + term
        scale *= size
    return index


def _phase_geometry(plan: AxisPlan):
    """Per tap ``(block shift, phase)``, the block count and the block padding ``(lo, hi)``."""
    shifts = [divmod(j * plan.dilation - plan.lo, plan.stride) for j in range(plan.kernel)]
    blocks = -(-plan.size // plan.stride)
    lo = max(0, -min(q for q, _ in shifts))
    hi = max(0, max(q for q, _ in shifts) + plan.out - blocks)
    return shifts, blocks, lo, hi


def _split_axes(t, plans):
    """``t`` with every plan's axis padded with zeros and reshaped to ``(blocks, stride)``."""
    geometry = [_phase_geometry(p) for p in plans]
    tail = [(0, 0, 0)] * t.ndim
    for plan, (_, blocks, _, _) in zip(plans, geometry, strict=True):
        tail[plan.axis] = (0, blocks * plan.stride - plan.size, 0)
    if any(hi for _, hi, _ in tail):
        t = lax.pad(t, jnp.zeros((), t.dtype), tail)
    shape, pads = [], []
    for axis, size in enumerate(t.shape):
        hit = [(p, g) for p, g in zip(plans, geometry, strict=True) if p.axis == axis]
        if not hit:
            shape.append(size)
            pads.append((0, 0, 0))
            continue
        plan, (_, blocks, lo, hi) = hit[0]
        shape += [blocks, plan.stride]
        pads += [(lo, hi, 0), (0, 0, 0)]
    return lax.pad(t.reshape(shape), jnp.zeros((), t.dtype), pads), geometry


def _split_pays(plans) -> bool:
    """Whether :func:`joint_pick` splits the phases apart (:func:`_phases`): on two or more
    strided axes with overlapping windows. Measured gradient, float32 NHWC: 3x3 stride 2
    padding 1 on (32, 112, 112, 64) 3.9 against 5.9 ms, on (32, 56, 56, 64) 0.66 against 1.2 ms;
    3x3 stride 3 (no overlap) 1.5 against 0.4 ms, 1-D k3 stride 2 on (64, 4096, 256) 18 against
    10 ms."""
    strided = [p for p in plans if p.stride > 1]
    return len(strided) >= 2 and any(p.kernel * p.dilation > p.stride for p in strided)


def _phases(u, plans, block_axis):
    """``u`` split along every stride axis: per phase combination ``(r_1, ..., r_n)`` an array
    whose stride axes have size 1. The transpose of the split is a concatenate, so the gradient
    evaluates for each element only the taps of its own phase."""
    arrays = {(): u}
    for plan in plans:
        axis = block_axis[plan.axis] + 1
        arrays = {
            (*key, r): piece
            for key, array in arrays.items()
            for r, piece in enumerate(lax.split(array, [1] * plan.stride, axis=axis))
        }
    return arrays


def joint_pick(t, plans, offset):
    """The tangent tap chosen by the flat ``offset`` in every window; linear in ``t``."""
    if tiles(plans):
        return _tiled_pick_p.bind(t, offset, plans=tuple(plans))
    return unsigned_zero_cotangent(_overlapping_pick(t, plans, offset))


def _overlapping_pick(t, plans, offset):
    """:func:`joint_pick` of windows that overlap or read padding: a select per tap of the
    unit slices at its block shift and phase, summed."""
    u, geometry = _split_axes(t, plans)
    block_axis = {p.axis: p.axis + i for i, p in enumerate(plans)}
    phases = _phases(u, plans, block_axis) if _split_pays(plans) else None
    total = None
    for combo in itertools.product(*(range(p.kernel) for p in plans)):
        starts, limits = [0] * u.ndim, list(u.shape)
        flat, phase = 0, []
        for plan, (shifts, _, lo, _), j in zip(plans, geometry, combo, strict=True):
            q, r = shifts[j]
            b = block_axis[plan.axis]
            starts[b], limits[b] = q + lo, q + lo + plan.out
            starts[b + 1], limits[b + 1] = (0, 1) if phases else (r, r + 1)
            flat = flat * plan.kernel + j
            phase.append(r)
        source = phases[tuple(phase)] if phases else u
        part = lax.slice(source, starts, limits).reshape(offset.shape)
        term = jnp.where(offset == flat, part, jnp.zeros((), t.dtype))
        total = term if total is None else total + term
    return total


def _tile_hits(offset, plans):
    """The blocks' shape ``(..., out, kernel, ...)``, its window axes, and where each block
    element is its window's winner (tap ``offset``, row-major over the window)."""
    _, wide = window_shapes(offset.shape, {p.axis: p.kernel for p in plans})
    window_axes = tuple(i + p.axis + 1 for i, p in enumerate(plans))
    tap = None
    for p, axis in zip(plans, window_axes, strict=True):
        j = lax.broadcasted_iota(offset.dtype, wide, axis)
        tap = j if tap is None else tap * jnp.asarray(p.kernel, offset.dtype) + j
    return wide, window_axes, tap == jnp.expand_dims(offset, window_axes)


def _tiled_pick(t, offset, *, plans):
    """The pick of windows that tile the input: ``t`` cropped to them and reshaped to
    ``(..., out, kernel, ...)``, one select and a sum over the window axes."""
    wide, window_axes, hit = _tile_hits(offset, plans)
    limits = list(t.shape)
    for p in plans:
        limits[p.axis] = p.out * p.kernel
    blocks = lax.slice(t, [0] * t.ndim, limits).reshape(wide)
    return jnp.sum(jnp.where(hit, blocks, jnp.zeros((), t.dtype)), axis=window_axes)


def _tiled_spread(g, offset, *, plans):
    """The adjoint of :func:`_tiled_pick`: each element of the windows selects its window's
    cotangent or zero, in one pass (a ``-0.0`` cotangent becomes ``+0.0``, as PyTorch adds
    it to zeros); elements past the last window get zero."""
    kernel = {p.axis: p.kernel for p in plans}
    expanded, _ = window_shapes(g.shape, kernel)
    _, _, hit = _tile_hits(_written(offset, plans[0].axis), plans)
    g = unsigned_zeros(g).reshape(expanded)
    spread = jnp.where(hit, g, jnp.zeros((), g.dtype))
    tiled = [n * kernel.get(axis, 1) for axis, n in enumerate(offset.shape)]
    pads = [(0, 0, 0)] * len(tiled)
    for p in plans:
        pads[p.axis] = (0, p.size - p.out * p.kernel, 0)
    return lax.pad(spread.reshape(tiled), jnp.zeros((), spread.dtype), pads)


def _written(a, axis: int):
    """``a`` after an in-place update of its first slice along ``axis`` with itself. XLA's CPU
    compiler writes a dynamic-update-slice out rather than fusing it into the loops that read
    it, so a loop that reads every element of ``a`` several times does not recompute it each
    time. The slice spans every other axis, so an array sharded along those updates locally."""
    first = lax.slice_in_dim(a, 0, 1, axis=axis)
    return lax.dynamic_update_slice_in_dim(a, first, 0, axis)


_tiled_pick_p = pick_pair("tiled", _tiled_pick, _tiled_spread)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def joint_winners(x, plans):
    """:func:`joint_max` with its offsets, for a tangent rule: the value's own derivative is the
    pick at the winners (:func:`joint_pick`), so the rule differentiates exactly at ties (its
    max of taps would split a tie's derivative among the tied taps)."""
    return joint_max(x, plans)


@joint_winners.defjvp
def _joint_winners_jvp(plans, primals, tangents):
    value, offsets = joint_winners(primals[0], plans)
    no_tangent = np.zeros(offsets.shape, jax.dtypes.float0)
    return (value, offsets), (joint_pick(tangents[0], plans, offsets), no_tangent)

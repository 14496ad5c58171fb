"""The max-pool derivative over all spatial axes at once, for regular windows.

The per-axis derivative of :mod:`jaxconv._src.select` keeps one offset per axis and picks the
tangent one axis at a time; its transpose builds the cotangent of every intermediate axis.
Here the winner of a whole window is one flat tap index (row-major over the window, int8 up to
127 taps), found after the forward pass by comparing each tap with the pooled value, and the
tangent pick reads every tap once:

- :func:`joint_offsets`: the output positions are split, per axis, into runs whose windows read
  the same taps (a padded border, the interior); each run reads its taps as plain strided slices
  (no padding inside the loop) and the runs are concatenated. The winner is the first tap equal
  to the maximum, or, where the maximum is NaN, the last NaN tap: PyTorch's tie rule.
- :func:`joint_pick`: every spatial axis is reshaped to ``(blocks, stride)``, so tap ``j`` of
  output ``o`` is block ``o + shift`` at phase ``r``: a unit slice. Its transpose, the gradient,
  is one loop of selects and edge pads over the input (no interior padding, no scatter), so it
  is bitwise reproducible and forward mode still works.

On (32, 56, 56, 64) float32 NHWC, max 3x3 stride 2 padding 1, the offsets measured about 0.5 ms
against about 2.5 ms for the per-axis variadic reductions, and the gradient about 1.2 ms against
about 1.9 ms for the per-axis pick.
"""

import itertools

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.window import AxisPlan

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


def _runs(plan: AxisPlan) -> list[tuple[int, int, tuple[int, ...]]]:
    """Maximal runs ``(start, stop, taps)`` of output positions that read the same real taps."""
    runs: list[tuple[int, int, tuple[int, ...]]] = []
    for o in range(plan.out):
        pos = o * plan.stride - plan.lo + np.arange(plan.kernel) * plan.dilation
        valid = tuple(int(j) for j in np.flatnonzero((pos >= 0) & (pos < plan.size)))
        if runs and runs[-1][2] == valid:
            runs[-1] = (runs[-1][0], o + 1, valid)
        else:
            runs.append((o, o + 1, valid))
    return runs


def _region_taps(x, plans, region):
    """``(flat tap index, strided slice)`` for every real tap of a product of runs."""
    out = []
    for combo in itertools.product(*(taps for _, _, taps in region)):
        starts, limits, strides = [0] * x.ndim, list(x.shape), [1] * x.ndim
        flat = 0
        for plan, (o0, o1, _), j in zip(plans, region, combo, strict=True):
            first = o0 * plan.stride - plan.lo + j * plan.dilation
            starts[plan.axis], strides[plan.axis] = first, plan.stride
            limits[plan.axis] = first + (o1 - o0 - 1) * plan.stride + 1
            flat = flat * plan.kernel + j
        out.append((flat, lax.slice(x, starts, limits, strides)))
    return out


def _region_winners(x, plans, region, dtype):
    """Max and (``dtype`` given) flat winner offsets of the outputs in ``region``."""
    taps = _region_taps(x, plans, region)
    if not taps:  # the window reads padding only: tap 0 (padding) has a zero tangent
        shape = list(x.shape)
        for plan, (o0, o1, _) in zip(plans, region, strict=True):
            shape[plan.axis] = o1 - o0
        return jnp.full(shape, -jnp.inf, x.dtype), jnp.zeros(shape, dtype or jnp.int8)
    v = taps[0][1]
    for _, tap in taps[1:]:
        v = lax.max(v, tap)
    if dtype is None:
        return v, None
    first = jnp.full(v.shape, taps[-1][0], dtype)
    for j, tap in reversed(taps[:-1]):
        first = jnp.where(tap == v, jnp.asarray(j, dtype), first)
    last_nan = jnp.full(v.shape, taps[0][0], dtype)
    for j, tap in taps[1:]:
        last_nan = jnp.where(jnp.isnan(tap), jnp.asarray(j, dtype), last_nan)
    return v, jnp.where(jnp.isnan(v), last_nan, first)


def _regions(plans, split: bool):
    """Products of runs, the largest first; with ``split`` never a single one (see
    :func:`joint_max`)."""
    regions = sorted(
        itertools.product(*(_runs(p) for p in plans)),
        key=lambda region: -int(np.prod([o1 - o0 for o0, o1, _ in region])),
    )
    if split and len(regions) == 1 and plans[0].out > 1:
        (o0, o1, taps), *rest = regions[0]
        regions = [((o0 + 1, o1, taps), *rest), ((o0, o0 + 1, taps), *rest)]
    return regions


def joint_max(x, plans, offsets: bool = True):
    """The max over every window and, with ``offsets``, per output the row-major flat tap index
    of its winner (PyTorch's tie rule; else None).

    The regions are written into the result with ``dynamic_update_slice``, which XLA stores as
    it goes. A single region is split in two on purpose: XLA would otherwise fuse the compares
    into the gradient's loop and evaluate them again for every tap of every input element
    (max 2x2x2 stride 2 on (4, 16, 56, 56, 32) forward+backward: 13 ms against 2.6 ms).
    """
    dtype = _flat_dtype(int(np.prod([p.kernel for p in plans]))) if offsets else None
    shape = list(x.shape)
    for plan in plans:
        shape[plan.axis] = plan.out
    value = jnp.zeros(shape, x.dtype)
    winners = jnp.zeros(shape, dtype) if offsets else None
    for region in _regions(plans, split=offsets):
        start = [0] * x.ndim
        for plan, (o0, _, _) in zip(plans, region, strict=True):
            start[plan.axis] = o0
        v, off = _region_winners(x, plans, region, dtype)
        value = lax.dynamic_update_slice(value, v, start)
        if offsets:
            winners = lax.dynamic_update_slice(winners, off, start)
    return value, winners


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


def joint_pick(t, plans, offset):
    """The tangent tap chosen by the flat ``offset`` in every window; linear in ``t``."""
    u, geometry = _split_axes(t, plans)
    block_axis = {p.axis: p.axis + i for i, p in enumerate(plans)}
    total = None
    for combo in itertools.product(*(range(p.kernel) for p in plans)):
        starts, limits = [0] * u.ndim, list(u.shape)
        flat = 0
        for plan, (shifts, _, lo, _), j in zip(plans, geometry, combo, strict=True):
            q, r = shifts[j]
            b = block_axis[plan.axis]
            starts[b], limits[b] = q + lo, q + lo + plan.out
            starts[b + 1], limits[b + 1] = r, r + 1
            flat = flat * plan.kernel + j
        part = lax.slice(u, starts, limits).reshape(offset.shape)
        term = jnp.where(offset == flat, part, jnp.zeros((), t.dtype))
        total = term if total is None else total + term
    return total

"""The entry point of max selection, and the winners' flat indices (``return_indices``).

:func:`select_max` is what max, adaptive max and fractional max pooling call. With indices, the
winner's flat row-major position in the unpadded spatial volume comes from the same selection
as the value: from the flat tap offsets of :mod:`jaxconv._src.joint` for small regular windows,
carried as payloads through one variadic ``reduce_window`` per axis for other regular windows,
and from the tap fold for other plans. The values keep the tangent rule of
:mod:`jaxconv._src.select`; the indices carry no derivative.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.cast import CONVERTED_TAPS, tap_groups
from jaxconv._src.joint import joint_index, joint_max, joint_pick, joint_winners
from jaxconv._src.order import from_key, is_narrow, lowest_key, order_key, tie_key
from jaxconv._src.select import (
    joint_path,
    max_reduce,
    max_stages,
    max_values,
    pick_at_winners,
    staged_max_jvp,
    values_reduced,
)
from jaxconv._src.window import AxisPlan, along
from jaxconv._src.window_argmax import (
    crop_out,
    key_wins,
    later_wins,
    offset_dtype,
    position_dtype,
    window_args,
)


def select_max(x, aux, plans, return_indices: bool):
    """The max over the plans' windows, and with ``return_indices`` the winners' flat indices.

    On the CPU float16 and bfloat16 values, winners and indices come from their int16 order keys
    (:mod:`jaxconv._src.order`) on every path, exact on subnormals, which XLA's CPU code reads as
    zero in float32 (a bfloat16 subnormal stays one in float32), and faster there than XLA's loops
    over 16-bit floats. GPUs keep subnormals, and compare the 16-bit values as they are for the
    value alone and in stacked stages. Tangents are picked in float32 unless no two windows overlap
    (then exactly in the 16-bit dtype). The joint windows' indices come from the keys apart from the
    value (which keeps its own derivative): bfloat16 max 3x3 stride 2 padding 1 with indices on
    (32, 56, 56, 64) forward 2.2-3.3 against 3.2-5.4 ms for float32 winners, forward plus backward
    1.5-1.8 against 1.15-1.2 ms (two passes over ``x`` instead of one). Fractional max 2x2 ratio 0.7
    with indices on bfloat16 (32, 56, 56, 64), random samples: forward 17.5-18.8 ms folding keys
    against 31-34 ms folding a float32 copy, forward plus backward 15.3-16 against 24-27.6 ms.
    """
    if not return_indices and is_narrow(x.dtype):
        return _narrow_max(x, aux, plans)
    if not return_indices:
        return max_reduce(x, aux, plans)
    sizes = tuple(p.size for p in plans)
    if is_narrow(x.dtype) and joint_path(plans):
        return _narrow_max(x, aux, plans), _narrow_joint_index(lax.stop_gradient(x), plans, sizes)
    return max_and_index(x, aux, plans, sizes)


def _narrow_joint_index(x, plans, sizes):
    """The flat indices of the winners of 16-bit joint windows, from the order keys (exact on
    subnormals; the value is :func:`_narrow_max`'s)."""
    _, offsets = joint_max(tie_key(order_key(x)), plans, fill=lowest_key(x.dtype))
    return joint_index(offsets, plans, sizes)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _narrow_max(x, aux, plans):
    """The max of 16-bit ``x``: on the CPU from its order keys (:func:`_key_max`). GPUs do not
    flush subnormals, so there ``x`` is reduced as it is: bfloat16 adaptive max 224 -> 7 on
    (32, 224, 224, 64) forward took 0.21-0.26 ms on an H100 that way, against 0.84 ms on keys
    (other cases of the benchmark measured the same either way)."""
    keyed = functools.partial(_keyed_max, plans=plans)
    plain = functools.partial(max_values, plans=plans)
    return lax.platform_dependent(x, aux, cpu=keyed, default=plain)


def _keyed_max(x, aux, plans):
    """The max of 16-bit ``x`` over the windows, from the max of its order keys."""
    return from_key(_key_max(x, aux, plans), x.dtype)


def _key_max(x, aux, plans):
    """The max of the order keys of ``x`` over the windows.

    Where the first spatial axis's windows are more than ``CONVERTED_TAPS`` taps (not a
    ``reduce_window``), its taps are keyed inside the loops that read them, in
    :func:`~jaxconv._src.cast.tap_groups`, and each group is reduced through every axis (a max
    does not depend on the order of the axes): with one key array for all taps, XLA's CPU
    compiler wrote the keys of all of ``x`` out first (bfloat16 adaptive max 224 -> 7 on
    (32, 224, 224, 64) forward: 7.7-8.4 ms against 14-14.6 ms).
    """
    fill = lowest_key(x.dtype)
    if joint_path(plans) or values_reduced(plans[0], jnp.int16):
        return max_values(order_key(x), aux, plans, fill)
    taps = plans[0].taps(x, jnp.asarray(-jnp.inf, x.dtype), aux[0])
    if len(taps) <= CONVERTED_TAPS:  # one key array (7 -> 1: 0.04-0.06 against 0.08 ms)
        return max_values(order_key(x), aux, plans, fill)
    totals = []
    for lo, hi in tap_groups(len(taps)):
        key = functools.reduce(lax.max, [order_key(t) for t in taps[lo:hi]])
        totals.append(max_values(key, aux[1:], plans[1:], fill) if len(plans) > 1 else key)
    return functools.reduce(lax.max, totals)


@_narrow_max.defjvp
def _narrow_max_jvp(plans, primals, tangents):
    """The joint path's value and winners from the keys. bfloat16 forward plus backward against
    float32 winners: max 3x3 stride 2 padding 1 on (32, 112, 112, 64) 9-11 against 16 ms, on
    (32, 56, 56, 64) 1.9-2.5 against 3.3-3.4 ms; 2x2 stride 2 1.4-1.7 against 1.4 ms (exact on
    subnormals, which float32 flushes on CPU). Other paths take value and winners from
    :func:`~jaxconv._src.select.staged_max_jvp`, whose stages compare keys as well. Where no
    two windows overlap (:func:`_disjoint`) each input element takes at most one output's
    tangent, so the staged picks run in the 16-bit dtype itself, exactly: bfloat16 adaptive
    max 224 -> 7 forward plus backward 23 against 26-28 ms, 3x3x3 stride 3 on
    (4, 18, 54, 54, 32) 6.1 against 11.2 ms. The joint path keeps float32 (2x2 stride 2 took
    35 against 1.3 ms in bfloat16)."""
    x, aux = primals
    t = tangents[0].astype(jnp.float32)
    if joint_path(plans):  # the primal again through _narrow_max, for higher orders
        _, offsets = joint_max(tie_key(order_key(x)), plans, fill=lowest_key(x.dtype))
        return _narrow_max(x, aux, plans), joint_pick(t, plans, offsets).astype(x.dtype)
    value, tangent = staged_max_jvp(x, aux, plans, tangents[0] if _disjoint(plans) else t)
    return value.astype(x.dtype), tangent.astype(x.dtype)


def _disjoint(plans) -> bool:
    """Regular windows that never overlap: each input element is picked by at most one output."""
    return all(isinstance(p, AxisPlan) and p.span <= p.stride for p in plans)


def max_and_index(x, aux, plans, sizes):
    """``max_reduce`` and the winners' :func:`flat_index` (int32, no tangent) in one pass.

    Small regular windows (:func:`jaxconv._src.select.joint_path`) turn their flat tap offsets
    into positions; other regular plans carry the winner's flat position through one variadic
    ``reduce_window`` per axis (row-major order is flat-position order, so the tie rule compares
    positions); other plans fold their taps.
    """
    if joint_path(plans):
        return _joint_max_and_index(x, plans, sizes)
    if all(isinstance(plan, AxisPlan) for plan in plans):
        value, index, _ = _flat_argmax(x, plans, sizes)
        return value, index
    return _max_and_index_folded(x, aux, plans, sizes)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _joint_max_and_index(x, plans, sizes):
    value, offsets = joint_max(x, plans)
    return value, joint_index(offsets, plans, sizes)


@_joint_max_and_index.defjvp
def _joint_max_and_index_jvp(plans, sizes, primals, tangents):
    value, offsets = joint_winners(primals[0], plans)
    index = joint_index(offsets, plans, sizes)
    no_tangent = np.zeros(index.shape, jax.dtypes.float0)
    return (value, index), (joint_pick(tangents[0], plans, offsets), no_tangent)


def _carry_winner(a, b, wins=later_wins):
    """``wins`` (:func:`later_wins`, or its order-key form) on ``(value, position)`` that also
    carries payloads (the earlier axes' winning positions). Within one axis's window the
    positions differ, so comparing them is comparing row-major order."""
    value, position = wins(a[:2], b[:2])
    b_won = position == b[1]
    payloads = [jnp.where(b_won, pb, pa) for pa, pb in zip(a[2:], b[2:], strict=True)]
    return (value, position, *payloads)


def _flat_argmax_stages(x, plans, sizes):
    """Value, flat index and per-step tap offsets of the winners of regular plans.

    Each axis is one variadic ``reduce_window`` over ``(value, position along the axis,
    positions won on the axes already reduced)``, positions in the smallest integer dtype.
    float16 and bfloat16 values are their int16 order keys throughout: bfloat16 adaptive max
    50 -> 7 with indices on (32, 50, 50, 64) 1.0-1.1 against 1.9 ms with a float32 copy of
    ``x``, max 5x5 stride 2 padding 2 2.9-3.6 against 4.8 ms.
    """
    narrow = x.dtype if is_narrow(x.dtype) else None
    if narrow is not None:
        x = order_key(x)
    low = lowest_key(narrow) if narrow is not None else jnp.asarray(-jnp.inf, x.dtype)
    carry = functools.partial(_carry_winner, wins=key_wins if narrow is not None else later_wins)
    payloads, stages = [], []
    for plan in reversed(plans):
        dtype = position_dtype(plan.size)
        position = lax.broadcasted_iota(dtype, x.shape, plan.axis)
        init = [low, jnp.asarray(jnp.iinfo(dtype).max, dtype)]
        init += [jnp.zeros((), p.dtype) for p in payloads]
        args = window_args(plan, x.ndim)
        x, where, *payloads = lax.reduce_window(
            (x, position, *payloads), tuple(init), carry, **args
        )
        x, where = crop_out(x, plan), crop_out(where, plan)
        payloads = [crop_out(p, plan) for p in payloads] + [where]
        start = along(np.arange(plan.out) * plan.stride - plan.lo, plan.axis, x.ndim)
        offset = (where.astype(jnp.int32) - jnp.asarray(start, jnp.int32)) // plan.dilation
        stages.append(offset.astype(offset_dtype(plan.kernel)))
    index = None
    for where, size in zip(reversed(payloads), sizes, strict=True):
        where = where.astype(jnp.int32)
        index = where if index is None else index * size + where
    return (x if narrow is None else from_key(x, narrow)), index, stages


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _flat_argmax(x, plans, sizes):
    return _flat_argmax_stages(x, plans, sizes)


@_flat_argmax.defjvp
def _flat_argmax_jvp(plans, sizes, primals, tangents):
    value, index, stages = _flat_argmax(primals[0], plans, sizes)
    t = tangents[0]
    if is_narrow(t.dtype) and not _disjoint(plans):  # overlapping windows sum in float32
        t = t.astype(jnp.float32)
    t = pick_at_winners(t, (None,) * len(plans), plans, stages)
    no_tangent = [np.zeros(v.shape, jax.dtypes.float0) for v in (index, *stages)]
    return (value, index, stages), (t.astype(value.dtype), no_tangent[0], no_tangent[1:])


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _max_and_index_folded(x, aux, plans, sizes):
    value, _, finals = max_stages(x, aux, plans)
    return value, flat_index(finals, aux, plans, sizes)


@_max_and_index_folded.defjvp
def _max_and_index_folded_jvp(plans, sizes, primals, tangents):
    x, aux = primals
    t, _ = tangents
    value, stages, finals = max_stages(x, aux, plans)
    index = flat_index(finals, aux, plans, sizes)
    if is_narrow(x.dtype):  # the order keys' bitcasts carry no derivative: the primal again
        value, index = _max_and_index_folded(x, aux, plans, sizes)  # through this rule
    no_tangent = np.zeros(index.shape, jax.dtypes.float0)
    # 16-bit tangents are picked in float32: overlapping cotangents are summed once
    wide = jnp.float32 if is_narrow(t.dtype) else t.dtype
    tangent = pick_at_winners(t.astype(wide), aux, plans, stages)
    return (value, index), (tangent.astype(t.dtype), no_tangent)


def flat_index(finals, aux, plans, sizes):
    """PyTorch's flat index of the winner in the unpadded spatial volume (row-major)."""
    index = None
    scale = 1
    for plan, a, offset, size in zip(
        reversed(plans), reversed(aux), finals, reversed(sizes), strict=True
    ):
        term = plan.position(offset, a) * scale
        index = term if index is None else index + term
        scale *= size
    return index

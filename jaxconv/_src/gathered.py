"""Max winners over gathered windows: every window's taps stacked by one gather.

Plans with ``gathered_winners`` (adaptive windows of varying lengths,
:class:`~jaxconv._src.adaptive.StackedAdaptivePlan`) hand :mod:`jaxconv._src.select` their taps
stacked after the axis by :meth:`window`. Their winners come from one variadic reduction over
``(value, offset)`` with PyTorch's tie rule as its comparator, which XLA's CPU compiler fuses with
the gather; their value alone reduces the stack only beyond ``WINDOW_VALUES_MIN_KERNEL`` taps.
Their tangent gathers the winners (the plans' ``pick``), on the CPU over all axes at once
(:func:`flat_pick`).
"""

import math

import jax.numpy as jnp
from jax import lax

from jaxconv._src.args import INT32_MAX
from jaxconv._src.order import from_key, is_narrow, order_key
from jaxconv._src.window_argmax import key_wins, later_wins, offset_dtype


def gathered(plan) -> bool:
    """Plans whose winners come from one variadic reduction over ``window``."""
    return getattr(plan, "gathered_winners", False)


# Gathered plans of more taps than this reduce ``window`` for the value alone too. Fewer fold
# their taps, which XLA's CPU compiler fuses best: float32 (8, 300, 300, 16) -> 7x7 (44 taps)
# 3.1-4.5 against 21-29 ms, bfloat16 keys of (32, 60, 60, 64) -> 7x7 2.4-3.3 against 18-20 ms;
# compile time grows with the taps (0.3-0.5 s at 44 in float32, 1.0-1.4 s in bfloat16).
WINDOW_VALUES_MIN_KERNEL = 64


def window_values(plan) -> bool:
    """Plans whose value alone reduces their ``window``, not their taps."""
    return gathered(plan) and plan.kernel > WINDOW_VALUES_MIN_KERNEL


def _nan_max(a, b):
    return jnp.where(jnp.isnan(a) | (a > b), a, b)


def stacked_max(w, axis: int):
    """The max of stacked taps along ``axis``, NaN where one is NaN (order keys: every NaN has
    the top key). Floats reduce with a NaN-propagating comparison, which XLA's CPU compiler
    fused with the gather of ``w`` more often than ``jnp.max``: float32 (32, 100, 100, 64) ->
    7x7 12.6 against 50 ms (108 ms with a second reduction for NaN)."""
    if jnp.issubdtype(w.dtype, jnp.integer):
        return jnp.max(w, axis=axis)
    return lax.reduce(w, jnp.asarray(-jnp.inf, w.dtype), _nan_max, (axis,))


def gathered_stage(w, axis: int, k: int):
    """Winner along the window axis ``axis`` of gathered taps ``w``: its value and offset from
    one variadic reduction over ``(value, offset)`` with the tie rule as its comparator
    (16-bit ``w`` compares its order keys). One pass that XLA fuses with the gather, where
    :mod:`~jaxconv._src.select`'s two reductions for tiling windows wrote ``w``
    out: float32 adaptive max 100 -> 7 winners on
    (32, 100, 100, 64) 65 against 88-103 ms and 5 against 180 MiB of temporaries. ``w`` may
    hold order keys already; their winner's key is returned."""
    if is_narrow(w.dtype):
        key, offset = gathered_stage(order_key(w), axis, k)
        return from_key(key, w.dtype), offset
    dtype = offset_dtype(k)
    offset = lax.broadcasted_iota(dtype, w.shape, axis)
    last = jnp.asarray(jnp.iinfo(dtype).max, dtype)  # never a tap's: loses every tie
    if jnp.issubdtype(w.dtype, jnp.integer):  # keys carry no derivative (higher orders)
        low = jnp.asarray(jnp.iinfo(w.dtype).min, w.dtype)
        return lax.reduce((lax.stop_gradient(w), offset), (low, last), key_wins, (axis,))
    init = (jnp.asarray(-jnp.inf, w.dtype), last)
    return lax.reduce((w, offset), init, later_wins, (axis,))


def flat_pickable(plans) -> bool:
    """Two or more gathered plans over a spatial volume whose flat positions fit in int32."""
    volume = math.prod(p.size for p in plans)
    return len(plans) > 1 and all(gathered(p) for p in plans) and volume <= INT32_MAX


def _take_merged(a, index, first: int, k: int):
    """``a`` at ``index``, flat positions over the ``k`` spatial axes from ``first`` (merged)."""
    merged = a.reshape((*a.shape[:first], -1, *a.shape[first + k :]))
    flat = index.reshape((*index.shape[:first], -1, *index.shape[first + k :]))
    return jnp.take_along_axis(merged, flat, first, mode="clip").reshape(index.shape)


def flat_pick(t, *stages, plans):
    """The tangent ``t`` at the winners of gathered ``plans``: one gather at their flat
    positions. ``stages`` are the winners' offsets in reduction order (last axis first); the
    offsets of each stage are read at the winners of the stages after it."""
    first, flat = plans[0].axis, None
    for k, (plan, offset) in enumerate(zip(plans, reversed(stages), strict=True)):
        if k:
            offset = _take_merged(offset, flat, first, k)
        position = plan.position(offset)
        flat = position if flat is None else flat * plan.size + position
    return _take_merged(t, flat, first, len(plans))

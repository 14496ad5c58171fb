"""Max winners over stacked taps: windows laid out on their own axis after the spatial one.

Tiling windows are a reshape (``(..., out, kernel, ...)``); their winners come from two
reductions (:func:`stacked_winner`), stored so that the tangent's transpose reads them.

Plans with ``gathered_winners`` (adaptive windows of varying lengths,
:class:`~jaxconv._src.adaptive.StackedAdaptivePlan`) hand :mod:`jaxconv._src.select` their taps
stacked after the axis by :meth:`window`. Their winners come from one variadic reduction over
``(value, offset)`` with PyTorch's tie rule as its comparator, which XLA's CPU compiler fuses with
the gather (at 13 to 24 taps from the tap fold instead, :data:`FOLDED_WINNERS_KERNELS`,
whose offsets are found first and values gathered at them); their
value alone reduces the stack only beyond ``WINDOW_VALUES_MIN_KERNEL`` taps (16-bit order keys
beyond ``KEY_WINDOW_VALUES_MIN_KERNEL``). Their tangent gathers the winners (the plans'
``pick``), on the CPU over all axes at once (:mod:`jaxconv._src.flat_pick`).
"""

import functools

import jax.numpy as jnp
from jax import lax

from jaxconv._src.order import from_key, is_narrow, order_key, signed_key, tie_key
from jaxconv._src.window_argmax import key_wins, later_wins, offset_dtype


def gathered(plan) -> bool:
    """Plans whose winners come from ``window``: one variadic reduction over it, or the tap fold
    (:func:`folds_winners`)."""
    return getattr(plan, "gathered_winners", False)


# Gathered plans of this many taps find their winners by the tap fold instead (their tangent
# still gathers at the winners): XLA's CPU compiler does not vectorise the variadic reduction,
# and its cost grows faster than the taps. The fold finds the offsets alone and gathers the
# values at them (:func:`~jaxconv._src.tap_fold.fold_at_winners`). float32 NHWC
# (32, S, S, 64) -> 7x7 forward plus backward on a slow 2-core machine (PyTorch channels_last
# 62 ms at 100 -> 7): 100 -> 7 (15-16 taps) 73-80 ms, 150 -> 7 (22-23) 136-149 ms; the
# variadic reduction took 164-189 and 368-416 ms. Fewer taps fold slower (60 -> 7, 9-10 taps:
# 14-17 against 6 ms). More taps fold faster too (200 -> 7, 30 taps: 292 against 595 ms), but
# the gradient then compiles in 1.4 against 0.6 s there.
FOLDED_WINNERS_KERNELS = range(13, 25)


def folds_winners(plan) -> bool:
    """Gathered plans whose winners come from the tap fold (:data:`FOLDED_WINNERS_KERNELS`)."""
    return gathered(plan) and plan.kernel in FOLDED_WINNERS_KERNELS


# Gathered plans of more taps than this reduce ``window`` for the value alone too; fewer fold
# their taps, whose loops XLA's CPU compiler fuses best for floats, but whose compile time grows
# with the taps. float32, forward: (8, 300, 300, 16) -> 7x7 (44 taps) 3.1-4.5 against 21-29 ms,
# (8, 410, 410, 16) -> 7x7 (60 taps) 4.9-5.1 against 61-63 ms, compiled in 0.8-0.9 against
# 0.3 s; (4, 1000, 1000, 16) -> 7x7 (144 taps) 25 against 187 ms, compiled in 2.4 against
# 0.35 s. 16-bit order keys reduce their window faster beyond 16 taps: bfloat16 (8, 410, 410,
# 16) -> 7x7 36-37 against 47-48 ms, compiled in 0.4 against 1.4-1.6 s; (32, 130, 130, 64) ->
# 4x4 (34 taps) 42 against 77-78 ms.
WINDOW_VALUES_MIN_KERNEL = 64
KEY_WINDOW_VALUES_MIN_KERNEL = 16


def window_values(plan, dtype) -> bool:
    """Plans whose value alone reduces their ``window`` of ``dtype`` (integers: order keys),
    not their taps."""
    keys = jnp.issubdtype(dtype, jnp.integer)
    least = KEY_WINDOW_VALUES_MIN_KERNEL if keys else WINDOW_VALUES_MIN_KERNEL
    return gathered(plan) and plan.kernel > least


def _nan_max(a, b):
    """The larger of ``a`` and ``b``, NaN if either is, +0 for a -0 and a +0 (in any order)."""
    return jnp.where(jnp.isnan(a) | (a > b) | ((a == b) & jnp.signbit(b)), a, b)


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
    :func:`stacked_winner`'s two reductions wrote ``w`` out: float32 adaptive max 100 -> 7
    winners on (32, 100, 100, 64) 65 against 88-103 ms and 5 against 180 MiB of temporaries.
    ``w`` may hold order keys already; their winner's key is returned."""
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


def stacked_stage(w, axis: int, k: int):
    """Winner along the window axis ``axis`` of stacked taps ``w``: its value and offset.

    On the CPU float16 and bfloat16 taps compare their order keys (:func:`stacked_winner`).
    GPUs do not flush subnormals, so there the 16-bit taps compare as they are: bfloat16
    adaptive max 224 -> 7 on (32, 224, 224, 64) forward plus backward took 0.49-0.53 ms on an
    H100 that way (with :func:`~jaxconv._src.argmax.select_max`'s forward likewise), against
    0.90 ms on keys.
    """
    if not is_narrow(w.dtype):
        return stacked_winner(w, axis, k, keyed=False)
    stage = functools.partial(stacked_winner, axis=axis, k=k)
    return lax.platform_dependent(
        w, cpu=functools.partial(stage, keyed=True), default=functools.partial(stage, keyed=False)
    )


def stacked_winner(w, axis: int, k: int, keyed: bool):
    """Winner along the window axis ``axis`` of stacked taps ``w``, from two reductions.

    The plain max, then one max over a key that ranks the taps by the tie rule: a NaN tap ``j``
    ranks ``k + j`` (the last NaN wins), a tap equal to the max ``k - 1 - j`` (the first wins),
    others ``-1``. Windows holding a NaN are decided by the key alone and their value set to
    NaN, whatever XLA's CPU max reduction (which may drop a NaN) returned for them; so the max
    reads ``w`` as it is (masking NaN first made XLA write a masked copy of the input: adaptive
    max 224 -> 7 on float32 NHWC (32, 224, 224, 64), forward plus backward 48-61 ms against
    38 ms). The offsets are a stored reduction result, so the tangent's transpose reads them
    instead of recomputing the winners per input element. The key is int8 where the ranks fit
    (``k <= 63``): adaptive max 224 -> 7 (32 taps) forward plus backward on (32, 224, 224, 64)
    float32 35-38 against 44-46 ms with int16 keys, bfloat16 23-24 against 29-33 ms.

    ``keyed`` float16 and bfloat16 taps reduce their :func:`~jaxconv._src.order.signed_key`
    (NaN is ranked apart), so subnormals compare exactly, where float32 compares on CPU read
    them as zero (a bfloat16 subnormal stays one in float32).
    """
    keys = signed_key(w) if keyed else w
    top = jnp.max(keys, axis=axis)
    tie = tie_key if keyed else (lambda v: v)
    hit = tie(keys) == jnp.expand_dims(tie(top), axis)
    dtype = jnp.int8 if 2 * k < 127 else jnp.int16 if 2 * k < 32767 else jnp.int32
    j = lax.broadcasted_iota(dtype, w.shape, axis)
    rank = jnp.where(
        jnp.isnan(w), j + jnp.asarray(k, dtype), jnp.where(hit, jnp.asarray(k - 1, dtype) - j, -1)
    )
    rank = jnp.max(rank, axis=axis)
    kk = jnp.asarray(k, dtype)
    offset = jnp.where(rank >= kk, rank - kk, kk - 1 - rank)
    top = from_key(top, w.dtype) if keyed else top
    value = jnp.where(rank >= kk, jnp.asarray(jnp.nan, w.dtype), top)
    return value, offset.astype(offset_dtype(k))

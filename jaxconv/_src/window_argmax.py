"""Winners along one regular axis from ``lax.reduce_window``, and the pick of their tangent.

Where a regular plan's windows overlap or read padding (e.g. 3x3 stride 2 padding 1), each axis
is one variadic ``reduce_window`` over ``(value, position along the axis)`` whose comparator is
PyTorch's tie rule written as a total order (:func:`later_wins`), positions in the smallest
integer dtype; 16-bit input compares its int16 order keys (:mod:`jaxconv._src.order`). The
tangent pick (:func:`phase_pick`) reshapes the axis to ``(blocks, stride)`` so that every tap is
a unit slice and the transpose has no interior padding and no scatter.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.order import from_key, is_nan, is_narrow, lowest_key, order_key, tie_key
from jaxconv._src.window import AxisPlan, along, pad_axis


def offset_dtype(kernel: int):
    """The smallest integer dtype that holds a tap offset in ``[0, kernel)``."""
    if kernel <= 127:
        return jnp.int8
    return jnp.int16 if kernel <= 32767 else jnp.int32


def use_reduce_window(plan) -> bool:
    """Regular plans whose windows overlap or read padding reduce with ``lax.reduce_window``."""
    if not isinstance(plan, AxisPlan):
        return False
    return plan.span > plan.stride or plan.lo > 0 or plan.hi_needed > 0


def window_args(plan: AxisPlan, ndim: int):
    """``lax.reduce_window`` dimensions, strides, padding and dilation for one axis."""
    dims, strides, dil = [1] * ndim, [1] * ndim, [1] * ndim
    pads = [(0, 0)] * ndim
    dims[plan.axis], strides[plan.axis], dil[plan.axis] = plan.kernel, plan.stride, plan.dilation
    pads[plan.axis] = (plan.lo, max(plan.hi_needed, 0))
    return dict(window_dimensions=dims, window_strides=strides, padding=pads, window_dilation=dil)


def crop_out(x, plan: AxisPlan):
    return lax.slice_in_dim(x, 0, plan.out, 1, plan.axis)


def position_dtype(size: int):
    """The smallest integer dtype holding positions ``[0, size)`` and a larger padding mark."""
    if size < 127:
        return jnp.int8
    return jnp.int16 if size < 32767 else jnp.int32


def later_wins(a, b):
    """PyTorch's tie rule as a total order on ``(value, position)``: NaN above all (the later
    NaN higher), then the larger value, then the earlier position. Associative and
    commutative, so ``reduce_window`` may combine in any order."""
    (va, ia), (vb, ib) = a, b
    nan_a, nan_b = jnp.isnan(va), jnp.isnan(vb)
    either = nan_a | nan_b
    b_wins = jnp.where(either, nan_b & (~nan_a | (ib > ia)), (vb > va) | ((vb == va) & (ib < ia)))
    return jnp.where(b_wins, vb, va), jnp.where(b_wins, ib, ia)


def key_wins(a, b):
    """:func:`later_wins` on ``(int16 order key, position)``: every NaN has the top key, and
    the zeros tie (:func:`~jaxconv._src.order.tie_key`); the winner keeps its own key."""
    (ka, ia), (kb, ib) = a, b
    ta, tb = tie_key(ka), tie_key(kb)
    b_wins = jnp.where(is_nan(ka) & is_nan(kb), ib > ia, (tb > ta) | ((tb == ta) & (ib < ia)))
    return jnp.where(b_wins, kb, ka), jnp.where(b_wins, ib, ia)


def _argmax_window(x, plan: AxisPlan):
    """Value and tap offset of the winner along one axis: one variadic ``reduce_window``.

    Padding reads as ``(-inf, largest position)``, so it never wins, not even against ``-inf``.
    float16 and bfloat16 compare their order keys (exact on subnormals) and keep their dtype, so
    a next ``reduce_window`` stage compares keys too: bfloat16 adaptive max 50 -> 7 on
    (32, 50, 50, 64) forward plus backward 1.85 against 2.57 ms with a float32 copy of ``x``
    (whose conversion alone took 1.3 ms).
    """
    dtype = position_dtype(plan.size)
    position = lax.broadcasted_iota(dtype, x.shape, plan.axis)
    last = jnp.asarray(jnp.iinfo(dtype).max, dtype)
    args = window_args(plan, x.ndim)
    if is_narrow(x.dtype):
        init = (lowest_key(x.dtype), last)
        key, where = lax.reduce_window((order_key(x), position), init, key_wins, **args)
        value = from_key(key, x.dtype)
    else:
        init = (jnp.asarray(-jnp.inf, x.dtype), last)
        value, where = lax.reduce_window((x, position), init, later_wins, **args)
    value, where = crop_out(value, plan), crop_out(where, plan)
    start = along(np.arange(plan.out) * plan.stride - plan.lo, plan.axis, x.ndim)
    offset = (where.astype(jnp.int32) - jnp.asarray(start, jnp.int32)) // plan.dilation
    return value, offset.astype(offset_dtype(plan.kernel))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def argmax_stage(x, plan: AxisPlan):
    """:func:`_argmax_window` with a derivative (so the tangent rule is differentiable too)."""
    return _argmax_window(x, plan)


@argmax_stage.defjvp
def _argmax_stage_jvp(plan, primals, tangents):
    value, offset = argmax_stage(primals[0], plan)
    no_tangent = np.zeros(offset.shape, jax.dtypes.float0)
    # 16-bit tangents are picked in float32: the transpose sums overlapping cotangents once
    wide = jnp.float32 if is_narrow(value.dtype) else value.dtype
    tangent = phase_pick(tangents[0].astype(wide), plan, offset).astype(value.dtype)
    return (value, offset), (tangent, no_tangent)


def phase_pick(t, plan: AxisPlan, offset, shift_offsets: bool = False):
    """The tap of ``t`` chosen by ``offset`` along a regular plan's axis; linear in ``t``.

    ``t`` is padded and reshaped to ``(blocks, stride)`` along the axis, so tap ``j`` (padded
    position ``o*stride + j*dilation = (o + q)*stride + r``) is the unit slice
    ``[q, q + out)`` of the blocks at phase ``r``. Per block shift ``q`` one compare picks the
    phase and a sum over the phase axis collapses it. The transpose is made of broadcasts,
    selects, edge pads and a reshape: no interior padding, no scatter.

    ``shift_offsets`` moves the shift by ``q`` from the tangent to the (primal) offsets: the
    compare and sum run over all blocks and the sum is sliced, so the transpose pads the
    cotangent as an operand inside one loop instead of materialising one padded array per
    shift. Measured faster on the spatial axes other than the last (see ``max.py``).
    """
    axis, s = plan.axis, plan.stride
    shifts = [divmod(j * plan.dilation, s) for j in range(plan.kernel)]
    most = max(q for q, _ in shifts)
    blocks = plan.out + most
    t = pad_axis(t, axis, plan.lo, blocks * s - plan.size - plan.lo, 0)
    t = t.reshape((*t.shape[:axis], blocks, s, *t.shape[axis + 1 :]))
    total = None
    for q in sorted({q for q, _ in shifts}):
        taps = np.full(s, -1, np.int32)
        for j, (qj, r) in enumerate(shifts):
            if qj == q:
                taps[r] = j
        taps = jnp.asarray(along(taps, axis + 1, t.ndim), offset.dtype)
        if shift_offsets:
            hit = jnp.expand_dims(pad_axis(offset, axis, q, most - q, -1), axis + 1) == taps
            term = jnp.sum(jnp.where(hit, t, jnp.zeros((), t.dtype)), axis=axis + 1)
            term = lax.slice_in_dim(term, q, q + plan.out, 1, axis)
        else:
            hit = jnp.expand_dims(offset, axis + 1) == taps
            part = lax.slice_in_dim(t, q, q + plan.out, 1, axis)
            term = jnp.sum(jnp.where(hit, part, jnp.zeros((), t.dtype)), axis=axis + 1)
        total = term if total is None else total + term
    return total

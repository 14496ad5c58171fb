"""The tangent at regular windows' winners, and its adjoint written over blocks of the input.

Regular windows that overlap or read padding (adaptive max 50 -> 7 is kernel 8 stride 7; max
pooling with more than 9 taps) find their winners one axis at a time, a ``reduce_window`` per
axis, and their tangent picks one axis at a time (:func:`~jaxconv._src.window_argmax.phase_pick`).
JAX transposes those picks axis by axis, into an array per axis the size of the input. On the
CPU the adjoint here (:func:`_spread`) writes the input's cotangent in one pass instead: each
padded axis of length ``B*s`` (stride ``s``) is seen as ``(B, s)`` blocks, and element ``r`` of
block ``I`` lies in windows ``I - d`` for ``d < ceil(span/s)``, at window offset ``r + d*s``
where that is below the window's span ``(k-1)*dilation + 1`` and a multiple of the dilation.
So each term is a window's cotangent broadcast over its block and kept where the window's
winner (its taps, one code per window) is that element: slices of one padded copy of the
cotangent and of the codes, broadcasts, compares and selects that XLA fuses into one loop, no
gather or scatter. Terms add in the windows'
row-major order, as PyTorch's CPU kernels add them, so the gradient is PyTorch's
bit for bit (the per-axis transposes add axis by axis). float32 NHWC (32, 50, 50, 64) -> 7x7,
separate processes, medians of 100 calls, on a machine whose memory moved 9 GB/s: the adjoint
alone 2.8 against 3.4-3.5 ms; forward plus backward 6.6-7.6 against 7.5-8.4 ms, bfloat16
6.6-8.5 against 7.5-8.4 ms (minimums 5.5-6.0 against 6.5-7.1 in both dtypes). The winners'
codes are left to XLA to fuse: written out by a reduction first, the adjoint took 3.5-3.9 ms.
Every shift is a slice of one padded copy of the cotangent and of the codes (:func:`_terms`).
Forward plus backward against the per-axis transposes, float32, medians of 40 interleaved calls
in one process on a machine whose memory moved 5 GB/s, on (32, 56, 56, 64): max 4x4 stride 2
padding 1 12.6 against 15.5 ms; 5x5 stride 2 padding 2 15.4 against 80; 4x4 stride 3 padding
1 7.2 against 8.8; 4x4 stride 2 padding 3 dilation 2 18.6 against 152; 3x3x3 stride 2 padding
1 on (4, 16, 56, 56, 32) 15.1 against 18.5; 50 -> 7 7.1 against 8.2 (bfloat16 5.9 against 6.8).

The pick and its adjoint are linear primitives, each the other's transpose
(:mod:`jaxconv._src.linear`), so forward mode runs the per-axis picks and higher orders work.
"""

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.flat_pick import pick_pair
from jaxconv._src.window import AxisPlan, pad_axis, pick_taps
from jaxconv._src.window_argmax import phase_pick, use_reduce_window


def block_pickable(plans) -> bool:
    """Regular plans whose windows overlap or read padding on every axis, with codes that fit
    int32 (:func:`_offset_code`)."""
    if not all(isinstance(p, AxisPlan) and use_reduce_window(p) for p in plans):
        return False
    return len(plans) * (_code_range(plans) + 1) < 2**31


def _code_range(plans) -> int:
    """Codes lie in ``[0, _code_range)``."""
    return math.prod(p.stride * _reach(p) for p in plans)


def _pick(t, *stages, plans):
    """The tap of ``t`` at each window's winner, one axis at a time (last axis first)."""
    for plan, offset in zip(reversed(plans), stages, strict=True):
        t = phase_pick(t, plan, offset, shift_offsets=plan is not plans[-1])
    return t


def _reach(plan: AxisPlan) -> int:
    """How many windows may hold one element: ``ceil(span / stride)``."""
    return -(-plan.span // plan.stride)


def _blocks(plan: AxisPlan) -> int:
    """Blocks of ``stride`` elements covering the padded axis (input and windows)."""
    return -(-max(plan.extent, plan.lo + plan.size) // plan.stride)


def _code(stages, plans):
    """Each window's winner as one int32 code: its taps along every axis (spatial order),
    axis ``a`` in base ``reach * stride``, above any tap (taps are below ``k <= span``)."""
    code, weight = None, 1
    for i, (plan, offset) in enumerate(zip(reversed(plans), stages, strict=True)):
        later = zip(reversed(plans[: len(plans) - 1 - i]), stages[i + 1 :], strict=True)
        for other, chosen in later:  # read this axis's offsets at the later axes' winners
            offset = pick_taps(other.taps(offset, jnp.asarray(0, offset.dtype)), chosen)
        term = offset.astype(jnp.int32) * weight
        code = term if code is None else code + term
        weight *= plan.stride * _reach(plan)
    return code


def _padded(v, plans, fill):
    """``v`` with a unit phase axis after each plan's axis, padded with ``fill`` to
    ``reach - 1`` blocks before the windows (room for the shifts of :func:`_terms`) and to
    ``_blocks`` after them."""
    for k, plan in enumerate(plans):
        axis = plan.axis + k
        v = pad_axis(v, axis, _reach(plan) - 1, _blocks(plan) - plan.out, fill)
        v = jnp.expand_dims(v, axis + 1)
    return v


def _terms(g, code, plans):
    """``(cotangent, code, offsets)`` per window that may hold an element, in row-major window
    order; arrays with a block axis and a unit phase axis per spatial axis. Each is a slice of
    one padded copy of ``g`` and of ``code``: XLA writes those once and reads every shift in
    the adjoint's loop (a pad per shift, inside the loop or written out, measured up to three
    times slower)."""
    terms = [(_padded(g, plans, 0), _padded(code, plans, -1), ())]
    for k, plan in enumerate(plans):
        axis, blocks, reach = plan.axis + k, _blocks(plan), _reach(plan)
        new = []
        for a, c, rel in terms:
            for d in reversed(range(reach)):
                start = reach - 1 - d
                a_d, c_d = (lax.slice_in_dim(v, start, start + blocks, 1, axis) for v in (a, c))
                new.append((a_d, c_d, (*rel, np.arange(plan.stride) + d * plan.stride)))
        terms = new
    return terms


def _offset_code(rel, plans, ndim: int) -> np.ndarray:
    """The code of the window offsets ``rel`` (one per axis, along its phase axis): of their
    taps, or below ``-1`` (no winner's code) where an offset falls between dilated taps or
    past the window."""
    code, scale = None, 1
    miss = _code_range(plans) + 1
    for k in reversed(range(len(plans))):
        plan, shape = plans[k], [1] * ndim
        shape[plan.axis + k + 1] = plan.stride
        tap, rest = np.divmod(rel[k], plan.dilation)
        tap = np.where((rest == 0) & (tap < plan.kernel), tap * scale, -miss)
        value = tap.reshape(shape).astype(np.int32)
        code = value if code is None else code + value
        scale *= plan.stride * _reach(plan)
    return code


def _spread(g, *stages, plans):
    """The adjoint of :func:`_pick`: every input element sums, in the windows' row-major order,
    the cotangents of the windows that hold it and chose it."""
    code = _code(stages, plans)
    total = None
    for a, c, rel in _terms(g, code, plans):
        hit = c == jnp.asarray(_offset_code(rel, plans, a.ndim))
        term = jnp.where(hit, a, jnp.zeros((), a.dtype))
        total = term if total is None else total + term
    shape = list(total.shape)
    for k, plan in reversed(list(enumerate(plans))):
        axis = plan.axis + k
        shape[axis : axis + 2] = [math.prod(shape[axis : axis + 2])]
    total = total.reshape(shape)
    for plan in plans:
        total = lax.slice_in_dim(total, plan.lo, plan.lo + plan.size, 1, plan.axis)
    return total


_pick_p = pick_pair("block", _pick, _spread)


def block_pick(t, *stages, plans):
    """The tangent ``t`` at the winners of ``plans`` (:func:`block_pickable`), whose offsets in
    reduction order are ``stages``; its adjoint is :func:`_spread`."""
    return _pick_p.bind(t, *stages, plans=plans)

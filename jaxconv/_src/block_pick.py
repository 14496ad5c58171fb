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
Every shift is a slice of one padded copy of the cotangent and of the codes (:func:`_padded`).
Forward plus backward against the per-axis transposes, float32, medians of 40 interleaved calls
in one process on a machine whose memory moved 5 GB/s, on (32, 56, 56, 64): max 4x4 stride 2
padding 1 12.6 against 15.5 ms; 5x5 stride 2 padding 2 15.4 against 80; 4x4 stride 3 padding
1 7.2 against 8.8; 4x4 stride 2 padding 3 dilation 2 18.6 against 152; 3x3x3 stride 2 padding
1 on (4, 16, 56, 56, 32) 15.1 against 18.5; 50 -> 7 7.1 against 8.2 (bfloat16 5.9 against 6.8).

Block phases that fewer windows reach (phases 1 to 6 of 50 -> 7 lie in one window per axis,
phase 0 in two) form pieces of their own, concatenated along the phase axes
(:func:`_axis_runs`), so each element sums only the terms that can hit it; a sum from
``+0.0`` as PyTorch's, which the ``-0.0`` cotangents become first. Against one expression of
every term, float32 and bfloat16 forward plus backward, medians of 25 interleaved calls on a
machine whose memory moved 10-15 GB/s: 50 -> 7 4.7 against 4.6 ms and 4.6 against 5.3; 5x5
stride 2 padding 2 11.2 against 12.1 and 12.0 against 13.4; 4x4 stride 3 padding 1 8.3
against 9.1 and 7.2 against 7.7; 4x4 stride 2 padding 3 dilation 2 10.6 against 14.1 and 14.2
against 15.1; 3x3x3 stride 2 padding 1 10.3 against 10.7 and 10.4 against 11.4.

The pick and its adjoint are linear primitives, each the other's transpose
(:mod:`jaxconv._src.linear`), so forward mode runs the per-axis picks and higher orders work.
"""

import itertools
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
    ``reach - 1`` blocks before the windows (room for the shifts of :func:`_piece`) and to
    ``_blocks`` after them."""
    for k, plan in enumerate(plans):
        axis = plan.axis + k
        v = pad_axis(v, axis, _reach(plan) - 1, _blocks(plan) - plan.out, fill)
        v = jnp.expand_dims(v, axis + 1)
    return v


# At most this many pieces of block phases (:func:`_axis_runs`): 3x3x3 stride 2 padding 1 on
# (4, 16, 56, 56, 32), forward plus backward, float32: 9.6 ms with two axes split (4 pieces),
# 10.2 with none, 16.4 with all three (8 pieces, which XLA's loop handled poorly).
MAX_PIECES = 4


def _runs(plan: AxisPlan) -> list[tuple[int, int, tuple[int, ...]]]:
    """Runs ``(lo, hi, shifts)`` of block phases ``[lo, hi)`` whose elements lie at a tap of
    the windows ``I - d`` for ``d`` in ``shifts``, descending (the windows' row-major order):
    offset ``r + d*stride`` below the span and on a multiple of the dilation."""
    reach, s = _reach(plan), plan.stride
    held = [
        tuple(
            d
            for d in reversed(range(reach))
            if r + d * s < plan.span and (r + d * s) % plan.dilation == 0
        )
        for r in range(s)
    ]
    runs, lo = [], 0
    for r in range(1, s + 1):
        if r == s or held[r] != held[lo]:
            runs.append((lo, r, held[lo]))
            lo = r
    return runs


def _axis_runs(plans) -> list[list[tuple[int, int, tuple[int, ...]]]]:
    """Per axis, the runs of :func:`_runs`, split from the first axis on while the pieces
    number at most ``MAX_PIECES``; an axis not split is one run of every shift (its
    offsets between dilated taps or past the window then never match a code)."""
    per_axis, pieces = [], 1
    for plan in plans:
        runs = _runs(plan)
        if pieces * len(runs) <= MAX_PIECES:
            pieces *= len(runs)
        else:
            shifts = {d for run in runs for d in run[2]}
            runs = [(0, plan.stride, tuple(sorted(shifts, reverse=True)))]
        per_axis.append(runs)
    return per_axis


def _piece(g, code, plans, runs):
    """The cotangent of the elements at block phases ``runs`` (one run per axis): the sum, in
    the windows' row-major order, of every window that may hold them and chose them. Each
    term is a slice of the padded ``g`` and ``code`` at one shift per axis."""
    total = None
    for shifts in itertools.product(*(run[2] for run in runs)):
        a, c, rel = g, code, []
        for k, (plan, d, (lo, hi, _)) in enumerate(zip(plans, shifts, runs, strict=True)):
            start = _reach(plan) - 1 - d
            a, c = (
                lax.slice_in_dim(v, start, start + _blocks(plan), 1, plan.axis + k) for v in (a, c)
            )
            rel.append(np.arange(lo, hi) + d * plan.stride)
        hit = c == jnp.asarray(_offset_code(rel, plans, a.ndim))
        term = jnp.where(hit, a, jnp.zeros((), a.dtype))
        total = term if total is None else total + term
    if total is None:  # no window reaches these phases
        shape = list(g.shape)
        for k, (plan, (lo, hi, _)) in enumerate(zip(plans, runs, strict=True)):
            shape[plan.axis + k : plan.axis + k + 2] = [_blocks(plan), hi - lo]
        total = jnp.zeros(shape, g.dtype)
    return total


def _pieces(g, code, plans, per_axis, runs=()):
    """:func:`_piece` for every run of every axis, concatenated along the phase axes."""
    k = len(runs)
    if k == len(plans):
        return _piece(g, code, plans, runs)
    parts = [_pieces(g, code, plans, per_axis, (*runs, run)) for run in per_axis[k]]
    return parts[0] if len(parts) == 1 else lax.concatenate(parts, plans[k].axis + k + 1)


def _offset_code(rel, plans, ndim: int) -> np.ndarray:
    """The code of the window offsets ``rel`` (one array per axis, along its phase axis): of their
    taps, or below ``-1`` (no winner's code) where an offset falls between dilated taps or
    past the window."""
    code, scale = None, 1
    miss = _code_range(plans) + 1
    for k in reversed(range(len(plans))):
        plan, shape = plans[k], [1] * ndim
        shape[plan.axis + k + 1] = len(rel[k])
        tap, rest = np.divmod(rel[k], plan.dilation)
        tap = np.where((rest == 0) & (tap < plan.kernel), tap * scale, -miss)
        value = tap.reshape(shape).astype(np.int32)
        code = value if code is None else code + value
        scale *= plan.stride * _reach(plan)
    return code


def _spread(g, *stages, plans):
    """The adjoint of :func:`_pick`: every input element sums, in the windows' row-major order,
    the cotangents of the windows that hold it and chose it, as PyTorch adds them to zeros
    (its caller, :func:`~jaxconv._src.select.pick_at_winners`, turns ``-0.0`` cotangents into
    ``+0.0`` first)."""
    code = _code(stages, plans)
    padded = _padded(g, plans, 0), _padded(code, plans, -1)
    total = _pieces(*padded, plans, _axis_runs(plans))
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

"""The tangent at adaptive max pooling's winners as one gather, and its adjoint as gathers.

Adaptive windows of varying lengths, fewer than the inputs, hold each input element at most twice
per axis. On the CPU their max pooling's tangent gathers ``t`` at the winners' flat positions in
the spatial volume, one per output (:func:`_pick`). JAX's transpose of that gather is a
scatter-add, which XLA's CPU code runs element by element; the adjoint here (:func:`_spread`)
instead gives every input element the cotangents of the windows that hold it and chose it: per
axis, the last window that starts at or before the element and, where two windows share it, the
one before (:meth:`~jaxconv._src.adaptive.AdaptivePlan.containing`), so ``2^n`` static-index
gathers of the cotangent and of the positions in ``n`` dimensions, compared with the element's
own position and summed in a fixed order. The two are linear primitives, each the other's
transpose (:mod:`jaxconv._src.linear`), so forward mode and higher orders keep working.
float32 / bfloat16 NHWC (32, S, S, 64) -> 7x7 forward plus backward, interleaved processes,
against the scatter: S = 60 5.5-6.7 / 3.9-4.0 ms against 7.3-8.8 / 7.6-8.3 (PyTorch channels_last
4.9 / 2.6); S = 100 28-33 / 23-25 against 28-33 / 29-30 (11.4 / 6.9). 1-D (64, 4096, 256) -> 300
bfloat16 89-92 against 135-142 ms.

The positions and the cotangent are written out by a reduction first
(:func:`~jaxconv._src.tap_fold.held`; stages that fold their taps write their offsets out
too): XLA otherwise fuses their computation into each of the adjoint's gathers and redoes it
per input element (float32 (32, 50, 50, 64) -> 7x7: 17 against 0.9 ms; 100 -> 7 with folded
stages 65 against 46 ms, timed under load; ``jax.grad`` of the sum of squares of 100 -> 7,
whose cotangent is twice the pooled value, 150 against 250-320 ms).
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jaxconv._src.args import INT32_MAX
from jaxconv._src.linear import adjoint_pair, linear_primitive
from jaxconv._src.tap_fold import held
from jaxconv._src.window import along


def flat_pickable(plans) -> bool:
    """Gathered plans (adaptive windows of varying lengths, fewer than the inputs: each input
    lies in at most two windows per axis) over a spatial volume whose positions fit in int32."""
    volume = math.prod(p.size for p in plans)
    return all(getattr(p, "gathered_winners", False) for p in plans) and volume <= INT32_MAX


def _merge(a, first: int, k: int):
    """``a`` with its ``k`` axes from ``first`` merged into one (empty arrays included)."""
    size = math.prod(a.shape[first : first + k])
    return a.reshape((*a.shape[:first], size, *a.shape[first + k :]))


def _take_merged(a, index, first: int, k: int):
    """``a`` at ``index``, flat positions over the ``k`` spatial axes from ``first`` (merged)."""
    flat = _merge(index, first, k)
    return jnp.take_along_axis(_merge(a, first, k), flat, first, mode="clip").reshape(index.shape)


def winner_index(stages, plans):
    """The winners' flat positions (int32) from ``stages``, their offsets in reduction order
    (last axis first); each stage's offsets are read at the winners of the stages after it."""
    first, flat = plans[0].axis, None
    for k, (plan, offset) in enumerate(zip(plans, reversed(stages), strict=True)):
        if k:
            offset = _take_merged(offset, flat, first, k)
        position = plan.position(offset).astype(jnp.int32)
        flat = position if flat is None else flat * plan.size + position
    return flat


def _opaque(g, index):
    """``g`` written out (:func:`~jaxconv._src.tap_fold.held`), behind a select on the winners'
    positions (never negative), so that XLA cannot constant-fold the static-index gathers of a
    constant ``g`` (the gradient of a sum): it evaluated them element by element at compile
    time (float32 (32, 100, 100, 64) -> 7x7, ``jax.grad`` of the sum: compiled in 26 s against
    1.0 s, on an idle machine; 134 s on a loaded one)."""
    return jnp.where(index >= 0, held(g), jnp.zeros((), g.dtype))


def _pick(t, index, *, plans):
    return _take_merged(t, index, plans[0].axis, len(plans))


def _neighbours(term, axis: int, last, before, inside):
    """A term ``(g, index, mask)`` read along ``axis`` at each position's last window and,
    where ``inside`` (windows overlap there), at the window before."""

    def take(v, at):
        at = jnp.asarray(at, jnp.int32)
        return jnp.take(v, at, axis=axis, mode="clip", indices_are_sorted=True)

    g, index, mask = term
    if inside is not None:  # the earlier window first: terms add in PyTorch's window order
        yield take(g, before), take(index, before), inside if mask is None else mask & inside
    yield take(g, last), take(index, last), mask


def _spread(g, index, *, plans):
    """The adjoint of :func:`_pick`: each input element sums, in a fixed order, the entries of
    ``g`` whose winner it is, among the (at most ``2^n``) windows holding it."""
    index = held(index)
    terms, own = [(_opaque(g, index), index, None)], None
    for plan in plans:
        last, before, shared = plan.containing()
        inside = jnp.asarray(along(shared, plan.axis, g.ndim)) if shared.any() else None
        terms = [n for t in terms for n in _neighbours(t, plan.axis, last, before, inside)]
        position = jnp.asarray(along(np.arange(plan.size, dtype=np.int32), plan.axis, g.ndim))
        own = position if own is None else own * plan.size + position
    total = None
    for a, index, mask in terms:
        hit = index == own if mask is None else (index == own) & mask
        term = jnp.where(hit, a, jnp.zeros((), a.dtype))
        total = term if total is None else total + term
    return total


def _resized(shape, plans, sizes: str):
    shape = list(shape)
    for p in plans:
        shape[p.axis] = getattr(p, sizes)
    return tuple(shape)


def _lead(params):
    return {"plans": tuple(dataclasses.replace(p, axis=p.axis + 1) for p in params["plans"])}


def pick_pair(name: str, pick, spread):
    """A pick at the winners of ``plans`` (outputs sized ``plan.out``) and its adjoint (sized
    ``plan.size``) as two linear primitives, each the other's transpose; returns the pick."""
    pick_p = linear_primitive(
        f"jaxconv_{name}_pick", pick, lambda shape, plans: _resized(shape, plans, "out"), _lead
    )
    spread_p = linear_primitive(
        f"jaxconv_{name}_spread",
        spread,
        lambda shape, plans: _resized(shape, plans, "size"),
        _lead,
    )
    adjoint_pair(pick_p, spread_p)
    return pick_p


_pick_p = pick_pair("flat", _pick, _spread)


def flat_pick(t, *stages, plans):
    """The tangent ``t`` at the winners of ``plans`` (:func:`flat_pickable`), whose offsets in
    reduction order are ``stages``: one gather at their flat positions, whose adjoint gathers
    (:func:`_spread`)."""
    return _pick_p.bind(t, winner_index(stages, plans), plans=plans)

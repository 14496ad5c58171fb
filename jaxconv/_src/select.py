"""Max selection over window taps with PyTorch's tie rule, and the tangent that follows it.

Max pooling, adaptive max pooling and fractional max pooling all reduce a box window one spatial
axis at a time. Each axis is described by a *plan*, any object with

- ``axis``: the array axis it reduces;
- ``taps(x, fill, aux)``: the ``k`` arrays whose entry at output position ``o`` is the ``j``-th
  element of window ``o`` (``fill`` where the window reads padding);
- ``valid(ndim)``: per tap, ``None`` when it always reads real input, else a boolean mask that
  broadcasts against the taps;
- ``position(offset, aux)``: the input coordinate read by tap ``offset`` at each output position.

``aux`` carries a plan's traced data (fractional pooling's random starts); static plans ignore it.

Tie rule (PyTorch's CPU kernels): scanning the window in row-major order, a value replaces the
current maximum when it is larger or NaN; so the first maximum wins and the last NaN wins. Reducing
the last spatial axis first and carrying the earlier winners' offsets keeps exactly that
lexicographic rule, one axis at a time.

The derivative is a ``jax.custom_jvp`` whose tangent picks, per axis, the tangent tap chosen by the
primal. That is linear in the tangent and made of slices, pads and selects, so reverse mode
transposes it into pads and adds (no scatter: deterministic on every backend), and forward mode and
higher orders work.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def offset_dtype(kernel: int):
    """The smallest integer dtype that holds a tap offset in ``[0, kernel)``."""
    if kernel <= 127:
        return jnp.int8
    return jnp.int16 if kernel <= 32767 else jnp.int32


def _fold(taps, valid, payloads):
    """Winner among ``taps`` per position: its value, its offset and its carried payloads."""
    dtype = offset_dtype(len(taps))
    value, ok, carry = taps[0], valid[0], list(payloads[0])
    offset = jnp.zeros(value.shape, dtype)
    for j in range(1, len(taps)):
        new = taps[j]
        win = (new > value) | jnp.isnan(new)
        if valid[j] is not None:
            win = win & valid[j]
        if ok is not None:
            win = win | ~ok
            ok = None if valid[j] is None else ok | valid[j]
        value = jnp.where(win, new, value)
        offset = jnp.where(win, jnp.asarray(j, dtype), offset)
        carry = [jnp.where(win, p, c) for p, c in zip(payloads[j], carry, strict=True)]
    return value, offset, carry


def max_stages(x, aux, plans):
    """Max over the window, reducing the last plan's axis first.

    Returns:
      ``(value, stages, finals)``: ``stages[i]`` is the offset chosen at reduction step ``i``,
      shaped like the array at that step (the tangent rule's residuals); ``finals[i]`` is the
      offset along the axis of step ``i`` for every output position.
    """
    fill = jnp.asarray(-jnp.inf, x.dtype)
    value, stages, finals = x, [], []
    for plan, a in zip(reversed(plans), reversed(aux), strict=True):
        value_taps = plan.taps(value, fill, a)
        payload_taps = [plan.taps(f, jnp.asarray(0, f.dtype), a) for f in finals]
        per_tap = list(zip(*payload_taps, strict=True)) if finals else [()] * len(value_taps)
        value, offset, finals = _fold(value_taps, plan.valid(value.ndim), per_tap)
        stages.append(offset)
        finals.append(offset)
    return value, stages, finals


def pick(t, aux, plans, stages):
    """The tangent taps chosen by ``stages``; linear in ``t``."""
    for plan, a, offset in zip(reversed(plans), reversed(aux), stages, strict=True):
        tt = plan.taps(t, jnp.asarray(0, t.dtype), a)
        t = tt[0]
        for j in range(1, len(tt)):
            t = jnp.where(offset == j, tt[j], t)
    return t


def max_values(x, aux, plans):
    """Max over the window without the winners: ``lax.max`` folds, which propagate NaN.

    The value does not depend on which maximum wins, so the primal (no tangent) skips the tie
    rule's compares and offsets.
    """
    fill = jnp.asarray(-jnp.inf, x.dtype)
    for plan, a in zip(reversed(plans), reversed(aux), strict=True):
        value_taps = plan.taps(x, fill, a)
        x = value_taps[0]
        for tap in value_taps[1:]:
            x = lax.max(x, tap)
    return x


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def max_reduce(x, aux, plans):
    """Max over box windows described by ``plans`` (spatial order), with PyTorch's tie rule."""
    return max_values(x, aux, plans)


@max_reduce.defjvp
def _max_reduce_jvp(plans, primals, tangents):
    x, aux = primals
    t, _ = tangents
    value, stages, _ = max_stages(x, aux, plans)
    return value, pick(t, aux, plans, stages)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def max_and_index(x, aux, plans, sizes):
    """``max_reduce`` and the winners' :func:`flat_index` (int32, no tangent) in one pass."""
    value, _, finals = max_stages(x, aux, plans)
    return value, flat_index(finals, aux, plans, sizes)


@max_and_index.defjvp
def _max_and_index_jvp(plans, sizes, primals, tangents):
    x, aux = primals
    t, _ = tangents
    value, stages, finals = max_stages(x, aux, plans)
    index = flat_index(finals, aux, plans, sizes)
    no_tangent = np.zeros(index.shape, jax.dtypes.float0)
    return (value, index), (pick(t, aux, plans, stages), no_tangent)


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

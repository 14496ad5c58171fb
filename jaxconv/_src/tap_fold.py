"""The tap fold: the winner among a window's taps with PyTorch's tie rule, tap by tap.

:func:`fold` selects, tap after tap, the running maximum, its offset and carried payloads.
Where the taps are gathers (adaptive windows of varying lengths, 13 to 24 taps), XLA's CPU
compiler fuses a gather into the loop that reads it only when one loop does, and a fold with
two results (value and offset) is two loops: every tap was gathered into memory first.
:func:`fold_at_winners` folds for the offset alone, writes it out (:func:`held`) and gathers the
value and payloads at the winners, one element per output (16-bit taps compare their order keys,
keyed inside the fold's loop). NHWC (32, S, S, 64) -> 7x7, on a slow 2-core machine on which
PyTorch channels_last took 11 ms forward and 62 ms forward plus backward for float32 100 -> 7;
medians, two runs each, against the fold of values and offsets together:

- float32 100 -> 7 (15-16 taps): forward with indices 28-34 against 123-136 ms, forward plus
  backward 73-80 against 164-189 ms, ``jax.grad`` of the sum of squares 82 against 319 ms;
- float32 150 -> 7 (22-23 taps): 50-56 against 263-308, 136-149 against 369-416, 164-169
  against 752-884 ms;
- bfloat16 100 -> 7: 49-51 against 60-112, 63-64 against 105-117, 57-61 against 306-385 ms.

Fewer taps keep their variadic reduction (:data:`~jaxconv._src.stacked.FOLDED_WINNERS_KERNELS`).
"""

import jax.numpy as jnp
from jax import lax

from jaxconv._src.order import is_nan, tie_key
from jaxconv._src.window_argmax import offset_dtype


def beats(new, old):
    """Whether tap ``new`` replaces the running maximum ``old``: larger, or NaN. Order keys
    compare as their floats do (:func:`~jaxconv._src.order.tie_key`: -0 ties with +0)."""
    if jnp.issubdtype(new.dtype, jnp.integer):
        return (tie_key(new) > tie_key(old)) | is_nan(new)
    return (new > old) | jnp.isnan(new)


def fold(taps, valid, payloads):
    """Winner among ``taps`` (floats or order keys) per position: its value, its offset and its
    carried payloads (``payloads[j]``: tap ``j``'s payloads)."""
    dtype = offset_dtype(len(taps))
    value, ok, carry = taps[0], valid[0], list(payloads[0])
    offset = jnp.zeros(value.shape, dtype)
    for j in range(1, len(taps)):
        new = taps[j]
        win = beats(new, value)
        if valid[j] is not None:
            win = win & valid[j]
        if ok is not None:
            win = win | ~ok
            ok = None if valid[j] is None else ok | valid[j]
        value = jnp.where(win, new, value)
        offset = jnp.where(win, jnp.asarray(j, dtype), offset)
        carry = [jnp.where(win, p, c) for p, c in zip(payloads[j], carry, strict=True)]
    return value, offset, carry


def held(a):
    """``a`` as the result of a reduction, which XLA's CPU compiler writes out rather than fusing
    its computation into every loop that reads it. Bit for bit: floats are held as integers."""
    if not jnp.issubdtype(a.dtype, jnp.integer):
        bits = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[a.dtype.itemsize]
        return lax.bitcast_convert_type(held(lax.bitcast_convert_type(a, bits)), a.dtype)
    low = jnp.asarray(jnp.iinfo(a.dtype).min, a.dtype)
    both = jnp.stack([a, jnp.full_like(a, low)], axis=-1)
    return lax.reduce(both, low, lax.max, (a.ndim,))


def fold_at_winners(x, plan, aux, fill, carried=()):
    """The winner along ``plan``'s axis of ``x`` (floats or order keys; ``fill`` past a
    window's end): its value, its offset (written out) and ``carried`` (arrays shaped like
    ``x``) at it, each gathered at the winners' positions. The value is ``x``'s element, so
    its derivative is the tangent's element there."""
    offset = winner_offset(plan.taps(x, fill, aux), plan.valid(x.ndim))
    value, *rest = at_winners((x, *carried), plan, aux, offset)
    return value, offset, rest


def winner_offset(taps, valid):
    """The tap fold's offsets alone (one loop, which reads the gathered taps), written out."""
    _, offset, _ = fold(taps, valid, [()] * len(taps))
    return held(offset)


def at_winners(arrays, plan, aux, offset):
    """Each of ``arrays`` (shaped like the input of ``plan``'s axis) at the winners."""
    at = plan.position(offset, aux)
    return [jnp.take_along_axis(v, at, plan.axis, mode="clip") for v in arrays]

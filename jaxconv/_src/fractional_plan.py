"""The plan of one spatial axis of fractional max pooling: windows at traced starts.

:class:`FractionalPlan` follows the plan protocol of :mod:`jaxconv._src.select` for windows
whose starts are data (PyTorch's random sequences and Graham's, see
:mod:`jaxconv._src.fractional`): taps are gathers, and the tangent picks from a band of regular
or static slices where the starts provably stay in one (:func:`band_holds`).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.args import INT32_MAX
from jaxconv._src.block_pick import block_pick, block_pickable
from jaxconv._src.window import AxisPlan, along
from jaxconv._src.window_argmax import phase_pick


@dataclasses.dataclass(frozen=True)
class FractionalPlan:
    """Windows of ``kernel`` taps (at most) along array axis ``axis``, starts given as ``aux``.

    ``aux = (start, length)``. ``start`` is an int32 array of the window starts that broadcasts
    against the array with ``out`` entries along ``axis``, or a 1-D array of ``out`` starts shared
    by every other axis. ``length`` is None (every window has ``kernel`` elements) or the window
    lengths, shaped like ``start``; taps past a window's end re-read its last element, which
    never changes the winner's position (see :meth:`position`).
    """

    axis: int
    size: int
    kernel: int
    out: int
    step: int | None = None
    band: bool = False  # PyTorch's starts that stay in the band of :meth:`pick` (see there)
    last: bool = False  # the last spatial axis: its pick is the first, on the input tangent
    first: int = 0  # the first spatial axis: the axes before it are batches (and channels)

    def _spread(self, v, ndim):
        """A 1-D per-output array shaped to broadcast along ``axis``; others pass through."""
        if v.ndim != 1 or ndim == 1:
            return v
        shape = [1] * ndim
        shape[self.axis] = v.shape[0]
        return v.reshape(shape)

    def _index(self, aux, j, ndim):
        start, length = aux
        start = self._spread(start, ndim)
        if length is None:
            return start + j
        return start + jnp.minimum(j, self._spread(length, ndim) - 1)

    # The plan protocol of jaxconv._src.select.
    def taps(self, x, fill, aux) -> list[jax.Array]:
        del fill  # every tap reads real input
        return [_take(x, self._index(aux, j, x.ndim), self.axis) for j in range(self.kernel)]

    def window(self, x, aux) -> jax.Array:
        """The taps stacked after ``axis`` (shape ``(..., out, kernel, ...)``) by one gather."""
        start, length = aux
        ax, k = self.axis, self.kernel
        if start.ndim == 1 and x.ndim > 1:  # shared starts: a (out, kernel) index table
            steps = jnp.arange(k, dtype=jnp.int32)[None, :]
            if length is not None:
                steps = jnp.minimum(steps, length[:, None] - 1)
            w = jnp.take(x, (start[:, None] + steps).reshape(-1), axis=ax, mode="clip")
        else:
            start = jnp.expand_dims(self._spread(start, x.ndim), ax + 1)
            shape = [1] * (x.ndim + 1)
            shape[ax + 1] = k
            index = start + lax.broadcasted_iota(jnp.int32, tuple(shape), ax + 1)
            flat = (*index.shape[:ax], index.shape[ax] * k, *index.shape[ax + 2 :])
            w = _take(x, index.reshape(flat), ax)
        return w.reshape(*w.shape[:ax], self.out, k, *w.shape[ax + 1 :])

    def _tap_indices(self, aux, ndim: int):
        """Per tap, the input index of every window (1-D for shared starts, else broadcasting
        against the array), and the axis of the windows in those indices."""
        shared = aux[0].ndim == 1
        indices = [self._index(aux, j, 1 if shared else ndim) for j in range(self.kernel)]
        return indices, 0 if shared else self.axis

    def distinct(self, aux, ndim: int) -> jax.Array:
        """Whether each tap of the windows before the last reads every input at most once.

        True unless rounding repeats a start: the increments are at least 1 (``alpha >= 1``);
        only the last window may start where the one before it does (PyTorch's last start is
        ``in - k`` whatever the sample; Graham's overlapping last window is clipped)."""
        indices, axis = self._tap_indices(aux, ndim)
        inner = [lax.slice_in_dim(i, 0, self.out - 1, 1, axis) for i in indices]
        return functools.reduce(
            jnp.logical_and, [jnp.all(jnp.diff(i, axis=axis) >= 1) for i in inner]
        )

    def distinct_taps(self, x, aux) -> list[jax.Array]:
        """:meth:`taps` as gathers of unique indices where :meth:`distinct`: one for the
        windows before the last, one for the last. Their transposes are scatters without
        collisions, whose sums are the same on every run on GPUs too."""
        indices, axis = self._tap_indices(aux, x.ndim)
        taps = []
        for index in indices:
            parts = [lax.slice_in_dim(index, lo, hi, 1, axis) for lo, hi in self._parts()]
            pieces = [_take_unique(x, part, self.axis) for part in parts]
            taps.append(lax.concatenate(pieces, self.axis) if len(pieces) > 1 else pieces[0])
        return taps

    def _parts(self) -> list[tuple[int, int]]:
        """The windows before the last, and the last."""
        return [(0, self.out - 1), (self.out - 1, self.out)] if self.out > 1 else [(0, 1)]

    @property
    def stored_winners(self) -> bool:  # measured faster with the band pick only
        return self.step is not None

    def pick(self, t, aux, offset) -> jax.Array | None:
        """The tap of ``t`` at ``offset`` for PyTorch's starts where ``band`` holds.

        With an integer ``alpha = step``, start ``i`` lies in ``[(i - 1)*step, (i + 1)*step]``,
        so the chosen input is in a band of ``2*step + kernel`` from ``(i - 1)*step``: a
        regular window of stride ``step`` (:func:`_band_pick`), whose pick transposes without
        a scatter. That holds where the samples' dtype holds every integer up to the axis size
        exactly, so that ``i + u`` rounds into ``[i, i + 1]``: up to 256 in bfloat16, 2048 in
        float16 (:func:`band_holds`). Other ``alpha``: :meth:`_base_pick`. None for Graham's
        windows and where the band does not hold."""
        start, length = aux
        if length is not None or not self.band:
            return None
        if self.step is None:
            return self._base_pick(t, aux, offset)
        a = self.step
        band = AxisPlan(self.axis, self.size, 2 * a + self.kernel, a, 1, a, 0, self.out)
        lo = along(np.arange(self.out, dtype=np.int32) * a - a, self.axis, offset.ndim)
        rel = self._spread(start, offset.ndim) + offset.astype(jnp.int32) - jnp.asarray(lo)
        narrow = band.kernel <= np.iinfo(np.int16).max
        return _band_pick(t, band, rel.astype(jnp.int16 if narrow else jnp.int32))

    def _bases(self) -> np.ndarray:
        """``floor(i*alpha)`` (exact) and the last start ``size - kernel``: PyTorch's start ``i``
        is this or one more, up to the rounding of its arithmetic."""
        if self.out == 1:
            return np.array([self.size - self.kernel], np.int64)
        bases = np.arange(self.out, dtype=np.int64) * (self.size - self.kernel) // (self.out - 1)
        bases[-1] = self.size - self.kernel
        return bases

    def _base_pick(self, t, aux, offset):
        """The tap at ``offset`` from a band of ``kernel + 3`` inputs from ``floor(i*alpha) - 1``
        (where :func:`band_holds` puts every start, non-integer ``alpha``).

        Band tap ``m`` is ``t`` at the static, strictly increasing positions ``floor(i*alpha) -
        1 + m`` along the axis, shared by every batch and channel, written as a scatter of
        whole slices to the outputs: its transpose (reverse mode) is a gather of slices, about
        5x faster than the scatter that transposes a gather, and none of them collide. The
        gathers of every window tap (:meth:`window`) built per-element index arrays in the
        forward pass and scattered them back: 2x2 windows, float32 (32, 56, 56, 64) -> 39x39
        on the CPU, forward plus backward 79 against 29 ms (PyTorch channels_last 25-28 ms).
        """
        width = self.kernel + 3
        lo = self._bases() - 1
        base = jnp.asarray(along(lo, self.axis, offset.ndim), jnp.int32)
        first = self._spread(aux[0], offset.ndim) - base  # the start's place in the band: 0..3

        # band_holds puts every start in the band, so both conds take their first branch;
        # as conditionals they are stored results, which XLA's CPU compiler otherwise fuses
        # into their users: it recomputed the winners for every use of ``rel`` and, in reverse
        # mode, one axis's gathers for every element of the next (forward plus backward 67 ->
        # 34 ms above). The last axis's tangent is the input's: its cond would only copy the
        # gradient out (25.6 against 26.6 ms, 2-D 0.7 ratio). The predicate is a constant
        # that XLA cannot see through: no check over the batch, which vmap would batch (a
        # select, whose guard reverse mode cannot transpose) and sharding would all-reduce.
        inside = lax.optimization_barrier(jnp.asarray(True))

        def band_place(first, offset):
            return first.astype(jnp.int8) + offset.astype(jnp.int8)

        def nowhere(first, offset):
            return jnp.full(jnp.broadcast_shapes(first.shape, offset.shape), -1, jnp.int8)

        rel = lax.cond(inside, band_place, nowhere, first, offset)
        t = t if self.last else lax.cond(inside, lambda t: t, jnp.zeros_like, t)
        shape = (*t.shape[: self.axis], self.out, *t.shape[self.axis + 1 :])

        def tap(m):
            real = (lo + m >= 0) & (lo + m < self.size)
            to = np.arange(self.size) + self.out  # out of range: dropped
            to[(lo + m)[real]] = np.flatnonzero(real)
            return _rows_to(t, to, shape, self.axis, self.first)

        chosen = tap(0)
        for m in range(1, width):
            chosen = jnp.where(rel == m, tap(m), chosen)
        return chosen

    def valid(self, ndim: int) -> list[None]:
        return [None] * self.kernel

    def position(self, offset, aux) -> jax.Array:
        return self._index(aux, offset.astype(jnp.int32), offset.ndim)


def band_holds(size: int, dtype, integer_alpha: bool = True) -> bool:
    """Whether PyTorch's starts computed in ``dtype`` stay in :meth:`FractionalPlan.pick`'s band.

    Integer ``alpha``: where ``dtype`` holds every integer up to ``size`` exactly (``i + u``
    rounds into ``[i, i + 1]``). Otherwise start ``i`` is ``floor(A) - floor(B)`` for the
    rounded products ``A ~ (i + u)*alpha`` and ``B ~ u*alpha``, so in ``{floor(A - B),
    floor(A - B) + 1}``, and ``A - B`` is ``i*alpha`` up to about ``3*size`` units of rounding:
    below 1 while ``4*size <= 2**(mantissa bits + 1)``, and then the start is within
    ``[floor(i*alpha) - 1, floor(i*alpha) + 2]``.
    """
    exact = 2 ** (jnp.finfo(dtype).nmant + 1)
    return size <= exact if integer_alpha else 4 * size <= exact


def _take_unique(x, index, axis):
    """:func:`_take` promising XLA that no two entries of ``index`` along ``axis`` are equal."""
    if index.ndim == 1 and x.ndim > 1:
        return jnp.take(x, index, axis, mode="clip", unique_indices=True, indices_are_sorted=True)
    shape = (*x.shape[:axis], index.shape[axis], *x.shape[axis + 1 :])
    where = [lax.broadcasted_iota(jnp.int32, shape, d) for d in range(x.ndim)]
    where[axis] = jnp.broadcast_to(index, shape)
    return x.at[tuple(where)].get(mode="promise_in_bounds", unique_indices=True)


def _take(x, index, axis):
    if index.ndim == 1 and x.ndim > 1:
        return jnp.take(x, index, axis=axis, mode="clip")
    return jnp.take_along_axis(x, index, axis=axis, mode="promise_in_bounds")


def _band_pick(t, band: AxisPlan, rel):
    """The tap ``rel`` of each window of ``band``. On the CPU a linear primitive whose adjoint
    reads ``rel`` (:mod:`jaxconv._src.block_pick`): reverse mode through the phase pick kept
    a mask per block shift from the forward pass, output-sized arrays written and read again."""
    phases = functools.partial(phase_pick, plan=band, shift_offsets=True)
    if not block_pickable((band,)):
        return phases(t, offset=rel)
    cpu = functools.partial(block_pick, plans=(band,))
    return lax.platform_dependent(t, rel, cpu=cpu, default=lambda t, rel: phases(t, offset=rel))


def _rows_to(t, to, shape, axis: int, first: int):
    """Rows ``j`` of ``t`` along ``axis`` at rows ``to[j]`` of zeros of ``shape`` (``to`` static
    and unique; ``to[j]`` past the axis: dropped); ``first`` is the first spatial axis.

    Along an inner spatial axis, one scatter over the spatial axes up to ``axis`` merged
    (:func:`_merged_rows_to`), batched over the axes before ``first``: XLA keeps it and its
    transpose, a gather of rows, in row-major order, where along ``axis`` alone
    (:func:`_axis_rows_to`) it put the scattered axis first and copied each axis's gradient
    back. The batch axes stay apart, so a batch-sharded gradient needs no collectives. 2x2 at
    ratio 0.7 on (32, 56, 56, 64), forward plus backward: float32 60 against 70 ms, bfloat16
    34 against 42 (medians of 20 interleaved calls on a machine whose memory moved 10 GB/s).
    Row numbers past int32 keep the scatter along the axis."""
    merged = math.prod(t.shape[first:axis]) * (shape[axis] + t.shape[axis])
    if axis == first or merged >= INT32_MAX:
        return _axis_rows_to(t, to, shape, axis)

    def rows_to(t):
        return _merged_rows_to(t, to, shape[first:], axis - first)

    for _ in range(first):
        rows_to = jax.vmap(rows_to)
    return rows_to(t)


def _merged_rows_to(t, to, shape, axis: int):
    """:func:`_rows_to` as one scatter of the rows of ``t`` with the axes up to ``axis``
    merged; rows dropped go past the end, each to a place of its own (the indices stay
    unique)."""
    size, out = t.shape[axis], shape[axis]
    lead = math.prod(t.shape[:axis])
    place = jnp.arange(lead, dtype=jnp.int32)[:, None]
    rows = place * out + jnp.asarray(to, jnp.int32)
    past = lead * out + place * size + jnp.arange(size, dtype=jnp.int32)
    rows = jnp.where(jnp.asarray(to < out), rows, past)
    dims = lax.ScatterDimensionNumbers(
        update_window_dims=tuple(range(1, t.ndim - axis)),
        inserted_window_dims=(0,),
        scatter_dims_to_operand_dims=(0,),
    )
    zeros = jnp.zeros((lead * out, *shape[axis + 1 :]), t.dtype)
    flat = t.reshape(lead * size, *t.shape[axis + 1 :])
    mode = lax.GatherScatterMode.FILL_OR_DROP
    merged = lax.scatter_add(zeros, rows.reshape(-1, 1), flat, dims, unique_indices=True, mode=mode)
    return merged.reshape(shape)


def _axis_rows_to(t, to, shape, axis: int):
    """:func:`_rows_to` as one scatter along ``axis`` (``to`` past the axis: dropped)."""
    where = (slice(None),) * axis + (jnp.asarray(to, jnp.int32),)
    return jnp.zeros(shape, t.dtype).at[where].add(t, mode="drop", unique_indices=True)

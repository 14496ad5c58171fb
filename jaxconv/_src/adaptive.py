"""Adaptive windows with PyTorch's exact boundaries, and adaptive max pooling.

Output ``i`` of an axis of input length ``In`` and output length ``Out`` reads the input interval
``[floor(i*In/Out), ceil((i+1)*In/Out))`` (PyTorch's ``AdaptivePooling.h``), for any
``In, Out >= 1``. Each spatial axis is an :class:`AdaptivePlan`: static numpy starts and lengths,
``k = max(length)`` taps, tap ``j`` valid where ``j < length``. Its taps are ``k`` strided slices
when the starts are an arithmetic progression (``In % Out == 0``, ``Out == 1`` and cases such as
50 -> 7), otherwise ``k`` gathers with static indices; the program size never depends on the
number of outputs. Max pooling over windows of varying lengths (``Out < In``), and averages over
such windows of more than ``STACKED_MEAN_MIN_KERNEL`` taps (:mod:`jaxconv._src.adaptive_avg`),
gather all taps at once instead (:class:`StackedAdaptivePlan`), so that their derivatives do not
grow with ``k`` either.

Max reuses the shared selection of :mod:`jaxconv._src.select` (PyTorch's tie rule, flat indices,
the linear ``custom_jvp`` tangent). Windows of one length at a fixed step (arithmetic starts
always have one length) are handed over as a regular :class:`~jaxconv._src.window.AxisPlan`, so
they take the regular windows' paths. CPU timings (2 shared cores, float32 NHWC batch 32 and 64
channels, medians, PyTorch channels_last beside them in the same run): 50 -> 7 forward plus
backward about 2.5 ms (PyTorch about 1.1 ms; this module's own taps measured about 200 ms);
224 -> 7 (32 taps per axis, windows tiling the axis, so select's two-reduction winners) forward
plus backward about 240 ms against PyTorch's 240 ms in one loaded run (it was about 1130 ms in
that run with the tap fold, whose winners XLA re-evaluated inside the gradient's loop).

Adaptive averages (:mod:`jaxconv._src.adaptive_avg`) sum over the same windows.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxconv._src.argmax import select_max
from jaxconv._src.args import (
    INT32_MAX,
    check_bool,
    check_floating,
    check_index_volume,
    is_int,
    layout_axes,
    spatial_rank,
)
from jaxconv._src.window import AxisPlan, along


@dataclasses.dataclass(frozen=True)
class AdaptivePlan:
    """The adaptive windows of one spatial axis (array axis ``axis``), ``size -> out``."""

    axis: int
    size: int
    out: int

    @property
    def starts(self) -> np.ndarray:
        return (np.arange(self.out, dtype=np.int64) * self.size) // self.out

    @property
    def lengths(self) -> np.ndarray:
        ends = -((-np.arange(1, self.out + 1, dtype=np.int64) * self.size) // self.out)
        return ends - self.starts

    def containing(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per input position: the last window that starts at or before it, the window before
        that one, and whether that one holds the position too (for ``out < size`` no position
        lies in more than these two)."""
        i = np.arange(self.size)
        last = np.maximum(np.searchsorted(self.starts, i, side="right") - 1, 0)
        before = np.maximum(last - 1, 0)
        shared = (last > 0) & (self.starts[before] + self.lengths[before] > i)
        return last, before, shared

    @property
    def kernel(self) -> int:
        return int(self.lengths.max())

    @property
    def stride(self) -> int | None:
        """The common step of the starts when they form an arithmetic progression, else None."""
        if self.out == 1:
            return 1
        steps = np.diff(self.starts)
        return int(steps[0]) if steps[0] > 0 and np.all(steps == steps[0]) else None

    # The plan protocol of jaxconv._src.select (``aux`` is unused: the plan is static).
    def taps(self, x, fill, aux=None) -> list[jax.Array]:
        """Tap ``j``: the input at ``start + j`` for every output (``fill`` past the end)."""
        stride = self.stride
        if stride is not None:
            need = (self.out - 1) * stride + self.kernel - self.size
            xp = _pad_high(x, self.axis, need, fill)
            stop = (self.out - 1) * stride + 1
            return [
                lax.slice_in_dim(xp, j, j + stop, stride, self.axis) for j in range(self.kernel)
            ]
        taps = []
        for j, ok in enumerate(self.valid(x.ndim)):
            tap = jnp.take(
                x,
                jnp.asarray(self.starts + j, jnp.int32),
                axis=self.axis,
                mode="fill",
                unique_indices=self.out <= self.size,
                indices_are_sorted=True,
            )
            taps.append(tap if ok is None else jnp.where(ok, tap, jnp.asarray(fill, x.dtype)))
        return taps

    def valid(self, ndim: int) -> list[np.ndarray | None]:
        lengths = self.lengths
        return [
            None if np.all(lengths > j) else along(lengths > j, self.axis, ndim)
            for j in range(self.kernel)
        ]

    def position(self, offset, aux=None) -> jax.Array:
        start = along(self.starts, self.axis, offset.ndim).astype(np.int32)
        return jnp.asarray(start) + offset.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class StackedAdaptivePlan(AdaptivePlan):
    """Windows of varying lengths (``out < size``) read by one gather of all their taps.

    :meth:`window` stacks every window's taps after the axis (``(..., out, kernel, ...)``) with
    one static-index gather, whose transpose is one scatter-add. Winners and indices reduce
    that stack (``gathered_winners`` in :mod:`jaxconv._src.select`) and the tangent gathers the
    winners (:meth:`pick`), so the derivative's program does not grow with the window length:
    (2, 300, 300, 4) -> 7x7 (44 taps) max pooling's gradient compiled in 0.2 against 10.8 s
    with one gather and one scatter per tap, and ran in 3.2 against 10.5 ms. It is faster for
    few taps too (float32 NHWC batch 32, 64 channels, forward plus backward, interleaved runs):
    56 -> 37 (3 taps) 30 against 107 ms, 60 -> 7 (10 taps) 5.6-10 against 51-71 ms, 100 -> 7
    (16 taps) 90-96 against 191-204 ms; with indices, 50 -> 9 forward 3-4 against 26-32 ms.

    A window shorter than ``kernel`` repeats its last element: the repeats never win a tie, and
    a NaN repeat stands for that element (:meth:`position` maps it back).
    """

    stored_winners = True
    gathered_winners = True

    @property
    def index(self) -> np.ndarray:
        """The ``(out, kernel)`` input positions of the stacked taps."""
        steps = np.minimum(np.arange(self.kernel)[None, :], self.lengths[:, None] - 1)
        return self.starts[:, None] + steps

    def window(self, x, aux=None) -> jax.Array:
        ax, index = self.axis, jnp.asarray(self.index.reshape(-1).astype(np.int32))
        w = jnp.take(x, index, axis=ax, mode="clip", indices_are_sorted=True)
        return w.reshape((*x.shape[:ax], self.out, self.kernel, *x.shape[ax + 1 :]))

    def mask(self, ndim: int) -> np.ndarray:
        """Where the stacked taps lie inside their window, shaped to broadcast against them."""
        inside = np.arange(self.kernel)[None, :] < self.lengths[:, None]
        shape = [1] * (ndim + 1)
        shape[self.axis], shape[self.axis + 1] = inside.shape
        return inside.reshape(shape)

    def position(self, offset, aux=None) -> jax.Array:
        last = along(self.lengths - 1, self.axis, offset.ndim).astype(np.int32)
        return super().position(jnp.minimum(offset.astype(jnp.int32), jnp.asarray(last)))

    def pick(self, t, aux, offset) -> jax.Array:
        """The tangent at the winners: one gather of an element per output, whose transpose
        scatters as many (not ``kernel`` times as many, as the pick from :meth:`window` does):
        float32 (32, 60, 60, 64) -> 7x7 transposed picks 12 against 26-33 ms."""
        return jnp.take_along_axis(t, self.position(offset), self.axis, mode="clip")


def _as_regular(plan: AdaptivePlan) -> AdaptivePlan | AxisPlan:
    """Windows of one length at a fixed step are a regular window (no padding): an AxisPlan.
    Other windows are a :class:`StackedAdaptivePlan` where they are fewer than the inputs (each
    input then lies in at most two windows); more (upsampling) keep their taps."""
    lengths = plan.lengths
    if plan.stride is None or np.any(lengths != lengths[0]):
        if plan.out < plan.size:
            return StackedAdaptivePlan(plan.axis, plan.size, plan.out)
        return plan
    stride = plan.size if plan.out == 1 else plan.stride
    return AxisPlan(plan.axis, plan.size, int(lengths[0]), stride, 1, 0, 0, plan.out)


def _pad_high(x, axis, amount, fill):
    if amount <= 0:
        return x
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (0, amount, 0)
    return lax.pad(x, jnp.asarray(fill, x.dtype), config)


def adaptive_plans(fname: str, shape, output_size, data_format) -> tuple[AdaptivePlan, ...]:
    """Validate the arguments and build one plan per spatial axis (``None`` keeps the size)."""
    n = spatial_rank(fname, "output_size", output_size)
    for value in output_size:
        if value is not None and (not is_int(value) or not 1 <= value <= INT32_MAX):
            raise ValueError(
                f"{fname}: `output_size` entries must be ints in [1, {INT32_MAX}] or None, got "
                f"{output_size!r}."
            )
    axes, _ = layout_axes(fname, len(shape), n, data_format)
    sizes = tuple(shape[a] for a in axes)
    if any(s < 1 for s in sizes):
        raise ValueError(f"{fname}: spatial sizes of `x` must be >= 1, got {sizes}.")
    return tuple(
        AdaptivePlan(a, s, s if o is None else int(o))
        for a, s, o in zip(axes, sizes, output_size, strict=True)
    )


def adaptive_max_pool(
    x: ArrayLike,
    output_size,
    *,
    return_indices: bool = False,
    data_format: str = "channels_last",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Adaptive max pooling over ``n = len(output_size)`` spatial axes, as PyTorch.

    The windows are those of :func:`adaptive_avg_pool`: along each axis, output ``i`` reads
    ``[floor(i*In/Out), ceil((i+1)*In/Out))``. Within a window the first maximum in row-major
    order wins and NaN propagates (the last NaN wins), as in ``AdaptiveMaxPool{1,2,3}d``.

    Args:
      x: ``(*batch, *spatial, C)`` for channels_last or ``(*batch, C, *spatial)`` for
        channels_first, a floating dtype.
      output_size: a sequence of ``n`` entries, each an int >= 1 or ``None`` (keep that axis).
      return_indices: also return the position of every maximum.
      data_format: "channels_last" or "channels_first".

    Returns:
      The pooled array (``x.shape`` with the spatial sizes replaced by ``output_size``, dtype
      ``x.dtype``); with ``return_indices``, also the int32 flat index of each maximum in the
      spatial volume of its (batch, channel), PyTorch's convention (``h*W + w`` in 2-D).

    Transformations: ``jit``, ``vmap``, ``grad``/``vjp``, ``jvp`` and higher orders; the
    derivative sends the cotangent to the selected maximum only, as PyTorch's.

    Example:
      >>> x = jnp.array([[0.0, 3.0, 1.0, 2.0, 5.0]])[..., None]
      >>> adaptive_max_pool(x, (2,))[0, :, 0]
      Array([3., 5.], dtype=float32)
    """
    fname = "adaptive_max_pool"
    x = check_floating(fname, "x", x)
    return_indices = check_bool(fname, "return_indices", return_indices)
    plans = tuple(_as_regular(p) for p in adaptive_plans(fname, x.shape, output_size, data_format))
    check_index_volume(fname, tuple(p.size for p in plans), return_indices)
    return select_max(x, (None,) * len(plans), plans, return_indices)

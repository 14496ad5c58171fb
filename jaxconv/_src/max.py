"""Max pooling with PyTorch's exact semantics, for any number of spatial axes.

The window is reduced one spatial axis at a time, last axis first (:mod:`jaxconv._src.select`),
with PyTorch's tie rule (first maximum wins, NaN propagates, padding never wins). The derivative
is select's ``jax.custom_jvp``: the tangent picks the winning tangent tap per axis, linear and made
of reshapes, slices and selects, so reverse mode transposes it into broadcasts, edge pads and adds
(no scatter: bitwise reproducible on every backend), and forward mode and higher orders work, with
window dilation too.

Windows of at most 9 taps (3x3, 2x2, 2x2x2, 1-D) take :mod:`jaxconv._src.joint`: the max and a
flat winner offset per output from strided slices, and one tangent pick over all taps. Forward
plus backward, float32 NHWC, interleaved in one process against the per-axis derivative below
(ms): 3x3 s2 p1 (32, 56, 56, 64) 3.2-3.4 against 4.5-6.1 (PyTorch channels_last 3.7), (8, 56,
56, 64) 0.74 against 1.4; (32, 112, 112, 64) 15.2 against 20.3; 2x2 s2 1.9-2.0 against 2.5-2.7;
2x2x2 s2 (4, 16, 56, 56, 32) 2.5 against 3.8; 1-D k3 s2 (64, 4096, 256) 32 against 40. Splitting
the stride phases apart in the gradient (windows overlapping on two or more strided axes) and
comparing against a max without NaN propagation then took 3x3 s2 p1 on (32, 112, 112, 64) to
11-12 ms (PyTorch channels_last 12.3-12.9 in the same process) and (32, 56, 56, 64) to 2.7-3.0 ms
(PyTorch 3.5-3.7).

Which reduction runs where otherwise was chosen by measurement on CPU (jax 0.10.2, 2 shared
cores, float32 NHWC, interleaved medians against flax.linen.max_pool and PyTorch channels_last
in one process):

- Windows that overlap or read padding (e.g. 3x3 stride 2 padding 1) use one ``lax.reduce_window``
  per axis: a max for the value, and for the derivative a variadic ``(value, position)`` reduction
  whose comparator is the tie rule written as a total order, with int8 positions where the axis
  is shorter than 127. On (32, 56, 56, 64) 3x3 s2 p1, strided-slice folds measured about 3-20 ms
  forward (slower still where the padding is applied per axis) against about 1-2 ms per-axis
  ``reduce_window``; the slice-fold derivative measured 50-60 ms (XLA recomputed the compares in
  every backward loop and emitted scalar interior-pad loops) against about 16-60 ms with the
  reduction (PyTorch channels_last about 58-120 ms in the same runs; flax about 250-520 ms).
  int16 positions instead of int32 cut the derivative from about 48 to 16 ms in one run.
- Non-overlapping, unpadded windows (e.g. 2x2 stride 2) fold the strided slices: on
  (32, 56, 56, 64) forward about 1.1-1.3 ms against about 2.0 ms for ``reduce_window``, and
  forward+backward about 19-25 ms against about 37 ms for the variadic reduction.
- The tangent pick reshapes the axis to ``(blocks, stride)`` so each tap is a unit slice; the
  transpose has no interior padding. On (32, 56, 56, 64) 2x2 s2 forward+backward it measured about
  17 ms against about 50 ms for per-tap strided-slice selects. On the spatial axes before the last
  the shift by whole blocks is applied to the int8 offsets rather than to the tangent, so the
  transpose pads the cotangent inside one loop: 3x3 s2 p1 forward+backward about 21-45 ms against
  63-98 ms with the shift on the tangent (2x2 s2: about 10 against 20 ms).
- ``return_indices`` carries each winner's position per axis (int8 where the axis is shorter than
  127) as a payload through the same variadic reductions: 3x3 s2 p1 forward about 21 ms against
  about 48-58 ms for the slice fold with per-axis padding.

Measured in one run after these choices (medians, ms; load from other jobs made absolute numbers
vary by 2-5x between runs, the ratios less): (32, 56, 56, 64) 3x3 s2 p1 forward+backward 35
(flax 395, PyTorch channels_last 67, NCHW 141), forward 1.9-7.6 (PyTorch channels_last 1.6-10);
2x2 s2 forward+backward 14 (flax 229, PyTorch channels_last 82).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxconv._src.argmax import select_max
from jaxconv._src.args import check_bool, check_floating, check_index_volume
from jaxconv._src.window import tap_valid, window_spec

_FNAME = "max_pool"


def max_pool(
    x: ArrayLike,
    window,
    stride=None,
    padding=0,
    *,
    dilation=1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    data_format: str = "channels_last",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Max pooling over ``n = len(window)`` spatial axes, with PyTorch's semantics.

    Output ``o`` along an axis is the maximum of the input at ``o*s - lo + j*d`` for
    ``j < k``, where the padding reads as ``-inf`` and never wins. The first maximum in
    row-major window order wins; a NaN in the window makes the output NaN (the last NaN wins).

    Padding: jaxconv accepts up to half the *dilated* span ``d*(k-1)+1`` on each side, where
    PyTorch accepts at most half the kernel ``k``. The wider rule is what "SAME" padding needs
    with dilation (e.g. ``k=3, d=2`` pads 2 per side). With dilation a window can still read
    padding only (e.g. an input of length 1, ``k=2, d=2``, padding 1, under either rule): its
    value is ``-inf``, its gradient 0 and its index -1, which :func:`jaxconv.max_unpool` drops
    (PyTorch returns an index outside the input there).

    Args:
      x: ``(*batch, *spatial, C)`` for channels_last or ``(*batch, C, *spatial)`` for
        channels_first; ``*batch`` may be empty or several axes. A floating dtype (float16 and
        bfloat16 are compared exactly, subnormals included: on the CPU as int16 order keys).
      window: the window size per spatial axis, a sequence of ``n`` ints.
      stride: an int or ``n`` ints; ``None`` means ``window``.
      padding: an int, ``n`` ints, ``n`` ``(lo, hi)`` pairs, "VALID" or "SAME".
      dilation: an int or ``n`` ints, the spacing between window taps.
      ceil_mode: round the output size up (the last window must start inside the input or
        the left padding).
      return_indices: also return the winners' indices.
      data_format: "channels_last" or "channels_first".

    Returns:
      The pooled array, ``x.shape`` with each spatial size ``in`` replaced by
      ``floor((in + lo + hi - d*(k-1) - 1 + (s-1 if ceil_mode else 0)) / s) + 1``, dtype
      ``x.dtype``. With ``return_indices``, a pair ``(values, indices)``: ``indices`` is int32,
      shaped like ``values``, the flat row-major position of each winner in the unpadded
      spatial volume of its (batch, channel) plane (``h*W + w`` in 2-D), as PyTorch returns
      and :func:`jaxconv.max_unpool` consumes. int32 limits the spatial volume to
      ``2**31 - 1`` elements when ``return_indices`` is set.

    Transformations: ``jit``, ``vmap``, ``grad``/``vjp``, ``jvp`` and higher orders
    (``hessian``), with or without dilation. The gradient goes to the winner only (PyTorch's
    rule) and is bitwise reproducible. With ``return_indices`` the values stay differentiable;
    the indices are integers and carry no derivative.

    Example:
      >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
      >>> max_pool(x, (2, 2))[0, ..., 0]
      Array([[ 5.,  7.],
             [13., 15.]], dtype=float32)
    """
    x = check_floating(_FNAME, "x", x)
    return_indices = check_bool(_FNAME, "return_indices", return_indices)
    spec = window_spec(_FNAME, x.shape, window, stride, padding, dilation, ceil_mode, data_format)
    aux = (None,) * spec.n
    if not return_indices:
        return select_max(x, aux, spec.plans, False)
    check_index_volume(_FNAME, tuple(p.size for p in spec.plans), True)
    values, index = select_max(x, aux, spec.plans, True)
    return values, _mark_padding_only(index, spec.plans)


def _mark_padding_only(index: jax.Array, plans) -> jax.Array:
    """Index -1 where a window reads padding only (a static pattern of the window geometry)."""
    empty = np.zeros((1,) * index.ndim, bool)
    for plan in plans:
        masks = tap_valid(plan, index.ndim)
        if any(m is None for m in masks):  # a tap that always reads input
            continue
        empty = empty | ~functools.reduce(np.logical_or, masks)
    return jnp.where(empty, -1, index) if empty.any() else index

"""Average pooling with PyTorch's exact divisor rules, for any number of spatial axes.

The window sum is separable: it is reduced one spatial axis at a time as a sum of the axis's
strided slices (:func:`jaxconv._src.window.taps`). The divisor is separable too: a product of
per-axis counts, computed here with numpy at trace time, so it costs nothing at run time.

Why slices and not ``lax.reduce_window``: on CPU (jax 0.10.2, 2 cores), the case
"avg 3x3 s1 p1 forward, float32 NHWC (32, 56, 56, 64)" measured a median of about 2.4 ms with
per-axis slices, about 9.7 ms with one 3x3 ``lax.reduce_window`` and about 6.7 ms with one 1-D
``reduce_window`` per axis; PyTorch channels_last measured about 2.6 ms. XLA fuses the slices
and adds into one vectorised loop, while an overlapping ``reduce_window`` runs as a scalar loop.
The sum is linear, so JAX differentiates the slices (into pads) in both modes at the same cost,
and no custom derivative rule is needed.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxconv._src.args import check_bool, check_floating, is_int
from jaxconv._src.window import AxisPlan, WindowSpec, taps, window_spec

_FNAME = "avg_pool"


def _axis_counts(plan: AxisPlan, count_include_pad: bool) -> np.ndarray:
    """How many elements of each output window count towards its divisor, along one axis."""
    start = np.arange(plan.out) * plan.stride - plan.lo
    end = start + plan.kernel
    low, high = (-plan.lo, plan.size + plan.hi) if count_include_pad else (0, plan.size)
    return np.minimum(end, high) - np.maximum(start, low)


def divisor(spec: WindowSpec, count_include_pad: bool, divisor_override: int | None):
    """The divisor of every output, as a scalar or a numpy array that broadcasts over the output.

    A product of per-axis counts; a scalar when every window has the same count.
    """
    if divisor_override is not None:
        return float(divisor_override)
    total = np.ones((1,) * spec.ndim)
    for plan in spec.plans:
        counts = _axis_counts(plan, count_include_pad)
        if np.all(counts == counts[0]):
            total = total * float(counts[0])
            continue
        shape = [1] * spec.ndim
        shape[plan.axis] = plan.out
        total = total * counts.reshape(shape)
    return float(total.item()) if total.size == 1 else total


def window_sum(x: jax.Array, spec: WindowSpec) -> jax.Array:
    """The sum of ``x`` over every window (zero padding), one spatial axis at a time."""
    for plan in spec.plans:
        parts = taps(x, plan, 0)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        x = total
    return x


def _check_divisor_override(value) -> int | None:
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise ValueError(
            f"{_FNAME}: `divisor_override` must be None or a positive int, got {value!r}."
        )
    return int(value)


def avg_pool(
    x: ArrayLike,
    window,
    stride=None,
    padding=0,
    *,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    data_format: str = "channels_last",
) -> jax.Array:
    """Average pooling over ``n = len(window)`` spatial axes, with PyTorch's semantics.

    Output ``o`` along an axis averages the window ``[o*s - lo, o*s - lo + k)`` of the input
    padded with zeros. The divisor is the part of the window inside ``[-lo, in + hi)`` when
    ``count_include_pad`` (so the overhang of ``ceil_mode`` is never counted), the part inside
    ``[0, in)`` otherwise, or ``divisor_override`` when given. float16 and bfloat16 inputs are
    summed in float32 and the result is returned in the input dtype.

    Args:
      x: ``(*batch, *spatial, C)`` for channels_last or ``(*batch, C, *spatial)`` for
        channels_first, a floating dtype.
      window: the window size per spatial axis, a sequence of ``n`` ints.
      stride: an int or ``n`` ints; ``None`` means ``window``.
      padding: an int, ``n`` ints, ``n`` ``(lo, hi)`` pairs, "VALID" or "SAME"; at most half
        the window on every side (PyTorch's rule).
      ceil_mode: round the output size up (the last window must start inside the input or
        the left padding).
      count_include_pad: count the padding in the divisor.
      divisor_override: a positive int that replaces the divisor.
      data_format: "channels_last" or "channels_first".

    Returns:
      The pooled array, shape ``x.shape`` with each spatial size ``in`` replaced by
      ``floor((in + lo + hi - k + (s - 1 if ceil_mode else 0)) / s) + 1`` (see
      :func:`jaxconv.conv_output_size`), dtype ``x.dtype``.

    Transformations: ``jit``, ``vmap``, ``grad``/``vjp``, ``jvp`` and higher orders
    (``hessian``): the op is linear in ``x`` and built from slices, pads and adds.

    Example:
      >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
      >>> avg_pool(x, (2, 2))[0, ..., 0]
      Array([[ 2.5,  4.5],
             [10.5, 12.5]], dtype=float32)
    """
    x = check_floating(_FNAME, "x", x)
    count_include_pad = check_bool(_FNAME, "count_include_pad", count_include_pad)
    divisor_override = _check_divisor_override(divisor_override)
    spec = window_spec(
        _FNAME, x.shape, window, stride, padding, 1, ceil_mode, data_format, pad_limit="kernel"
    )
    compute = jnp.float32 if jnp.finfo(x.dtype).bits < 32 else x.dtype
    total = window_sum(x.astype(compute), spec)
    div = divisor(spec, count_include_pad, divisor_override)
    return (total / jnp.asarray(div, compute)).astype(x.dtype)

"""N-d convolution on ``lax.conv_general_dilated``.

``conv`` passes ``dimension_numbers`` that match ``data_format`` and the weight layout, so no
array is transposed and, with ``padding_mode="zeros"``, a single batch axis and no bias, the traced
program is exactly one ``conv_general_dilated`` (with an explicit ``pad`` in front in the two
configurations whose gradient XLA's CPU backend mishandles, see
:mod:`jaxconv._src.conv_workarounds`). Other padding modes pad explicitly (reflect, edge, wrap)
and then run a VALID convolution. Grouped convolutions are the exception on the CPU, where XLA
does ``groups`` times the work: depthwise ones of up to 49 taps are a sum of window taps there
(:mod:`jaxconv._src.depthwise`), others one dense convolution per group
(:mod:`jaxconv._src.grouped`). So are 1x1 kernels, a matrix product on the CPU
(:mod:`jaxconv._src.pointwise`).

:func:`~jaxconv.conv_transpose` (:mod:`jaxconv._src.conv_transpose`) is its adjoint in ``x``.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv._src.args import check_data_format, check_floating, is_int, layout_axes, per_axis
from jaxconv._src.arithmetic import pool_output_size_1d, resolve_padding
from jaxconv._src.conv_workarounds import pad_explicitly
from jaxconv._src.depthwise import depthwise_conv, depthwise_plans, is_depthwise
from jaxconv._src.grouped import grouped_conv, split_groups
from jaxconv._src.pointwise import is_pointwise, pointwise_conv

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_NUMPY_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where things live in ``x`` (batch flattened to one axis) and in ``w``."""

    n: int
    data_format: str
    batch_shape: tuple[int, ...]
    sizes: tuple[int, ...]
    kernel: tuple[int, ...]
    channels: int
    w_in: int
    w_out: int

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        """Spatial axes of the flattened (one batch axis) array."""
        first = 1 if self.data_format == "channels_last" else 2
        return tuple(range(first, first + self.n))

    @property
    def channel_axis(self) -> int:
        return self.n + 1 if self.data_format == "channels_last" else 1

    def dimension_numbers(self, *, transpose: bool = False) -> lax.ConvDimensionNumbers:
        lhs = (0, self.channel_axis, *self.spatial_axes)
        n = self.n
        if self.data_format == "channels_last":  # w: (*kernel, I, O)
            out_axis, in_axis, spatial = n + 1, n, tuple(range(n))
        else:  # w: (O, I, *kernel)
            out_axis, in_axis, spatial = 0, 1, tuple(range(2, n + 2))
        if transpose:
            out_axis, in_axis = in_axis, out_axis
        return lax.ConvDimensionNumbers(lhs, (out_axis, in_axis, *spatial), lhs)


def _check_arrays(fname: str, name: str, x, w, bias):
    x = check_floating(fname, name, x)
    w = check_floating(fname, "w", w)
    if x.dtype != w.dtype:
        raise TypeError(
            f"{fname}: `{name}` and `w` must have the same dtype, got {x.dtype} and {w.dtype}."
        )
    if bias is not None:
        bias = check_floating(fname, "bias", bias)
        if bias.dtype != x.dtype:
            raise TypeError(
                f"{fname}: `bias` must have the dtype of `{name}` ({x.dtype}), got {bias.dtype}."
            )
    if w.ndim < 3:
        raise ValueError(
            f"{fname}: `w` must have n + 2 >= 3 axes for n >= 1 spatial axes, got shape {w.shape}."
        )
    return x, w, bias


def _layout(fname: str, name: str, x, w, data_format) -> _Layout:
    """Validate the ranks and the layout of ``x`` and ``w``; sizes from their shapes."""
    n = w.ndim - 2
    check_data_format(fname, data_format)
    if x.ndim < n + 1:
        layout = (
            "(*batch, *spatial, C)" if data_format == "channels_last" else "(*batch, C, *spatial)"
        )
        raise ValueError(
            f"{fname}: `{name}` must have at least {n + 1} axes, {layout} with {n} spatial axes "
            f"(from `w` with shape {w.shape}), got shape {x.shape}."
        )
    axes, channel_axis = layout_axes(fname, x.ndim, n, data_format)
    if data_format == "channels_last":
        kernel, w_in, w_out = w.shape[:n], w.shape[n], w.shape[n + 1]
    else:
        kernel, w_in, w_out = w.shape[2:], w.shape[1], w.shape[0]
    if min(kernel) < 1:
        raise ValueError(f"{fname}: the kernel sizes of `w` must be >= 1, got {tuple(kernel)}.")
    batch_shape = x.shape[: x.ndim - n - 1]
    sizes = tuple(x.shape[a] for a in axes)
    if min(sizes) < 1:
        raise ValueError(f"{fname}: the spatial sizes of `{name}` must be >= 1, got {sizes}.")
    return _Layout(
        n, data_format, batch_shape, sizes, tuple(kernel), x.shape[channel_axis], w_in, w_out
    )


def _check_groups(fname: str, name: str, groups, got: int, per_group: int, total: int) -> int:
    """``got`` channels of ``name`` are ``groups * per_group``; ``total`` is divisible by groups."""
    if not is_int(groups):
        raise TypeError(f"{fname}: `groups` must be an int, got {groups!r}.")
    if groups < 1:
        raise ValueError(f"{fname}: `groups` must be >= 1, got {groups}.")
    if got % groups:
        raise ValueError(
            f"{fname}: the {got} channels of `{name}` are not divisible by groups={groups}."
        )
    if got // groups != per_group:
        raise ValueError(
            f"{fname}: `w` expects {per_group} channels per group, but `{name}` has {got} "
            f"channels and groups={groups} ({got} // {groups} = {got // groups})."
        )
    if total % groups:
        raise ValueError(
            f"{fname}: the {total} output channels of `w` are not divisible by groups={groups}."
        )
    return int(groups)


def _check_bias(fname: str, bias, channels: int) -> None:
    if bias is not None and bias.shape != (channels,):
        raise ValueError(
            f"{fname}: `bias` must have shape ({channels},) (one per output channel), "
            f"got {bias.shape}."
        )


PrecisionArg = str | lax.Precision | tuple[str | lax.Precision, str | lax.Precision] | None
"""What :func:`conv` accepts as ``precision`` (``lax.conv_general_dilated``'s, less dot
algorithms)."""

_PRECISIONS = (
    "default",
    "high",
    "highest",
    "fastest",
    "bfloat16",
    "bfloat16_3x",
    "tensorfloat32",
    "float32",
)


def _check_precision(fname: str, precision):
    """``precision`` as ``lax.conv_general_dilated`` takes it: None, a ``lax.Precision`` or its
    name, or a pair of these (for ``x`` and ``w``)."""

    def ok(p):
        return isinstance(p, lax.Precision) or (isinstance(p, str) and p in _PRECISIONS)

    if not (precision is None or isinstance(precision, (str, lax.Precision, tuple, list))):
        raise TypeError(
            f"{fname}: `precision` must be None, a jax.lax.Precision, a string or a pair, got "
            f"{precision!r} of type {type(precision).__name__}."
        )
    pair = isinstance(precision, (tuple, list)) and len(precision) == 2
    if not (precision is None or ok(precision) or (pair and all(map(ok, precision)))):
        raise ValueError(
            f"{fname}: `precision` must be None, a jax.lax.Precision, one of {_PRECISIONS} "
            f"or a pair of these (for the input and the kernel), got {precision!r}."
        )
    return tuple(lax.Precision(p) for p in precision) if pair else precision


def _one_batch_axis(x, batch_shape):
    """``x`` with exactly one leading batch axis: added (none), kept (one) or merged (several)."""
    if len(batch_shape) == 1:
        return x
    return x.reshape((math.prod(batch_shape), *x.shape[len(batch_shape) :]))


def _restore_batch(out, batch_shape):
    if len(batch_shape) == 1:
        return out
    return out.reshape((*batch_shape, *out.shape[1:]))


def bias_dtype(dtype, bias):
    """The dtype the convolution returns before its bias is added: float32 for float16 and
    bfloat16 with a bias, so that the sum is rounded once, as PyTorch's (a 16-bit convolution
    rounded first, then again with the bias: 18-29% of bfloat16 outputs were one unit off the
    correctly rounded result, errors up to 4.3e-3 against PyTorch's 2.8e-3). Else None: the
    input's dtype."""
    return jnp.float32 if bias is not None and dtype in (jnp.float16, jnp.bfloat16) else None


def _add_bias(out, bias, channel_axis: int, dtype):
    """``out + bias`` on the channel axis, as ``dtype``; in float32 for half dtypes (``out`` is
    float32 there, :func:`bias_dtype`), so that the sum is rounded once and the bias gradient
    (a sum over batch and space) is accumulated in float32."""
    if bias is None:
        return out
    shape = [1] * out.ndim
    shape[channel_axis] = bias.shape[0]
    bias = bias.reshape(shape)
    if dtype in (jnp.float16, jnp.bfloat16):
        return (out.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)
    return out + bias


def _pad_mode(fname: str, x, layout: _Layout, pads, padding_mode):
    """Explicit non-zero padding of the spatial axes (PyTorch's size rules)."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"{fname}: `padding_mode` must be one of {PADDING_MODES}, got {padding_mode!r}."
        )
    if padding_mode == "zeros":
        return x, pads
    for size, (lo, hi) in zip(layout.sizes, pads, strict=True):
        if padding_mode == "reflect" and max(lo, hi) >= size:
            raise ValueError(
                f"{fname}: with padding_mode='reflect', `padding` must be smaller than the input "
                f"size on every spatial axis, got ({lo}, {hi}) for size {size}."
            )
        if padding_mode == "circular" and max(lo, hi) > size:
            raise ValueError(
                f"{fname}: with padding_mode='circular', `padding` must be at most the input size "
                f"on every spatial axis (it wraps around once), got ({lo}, {hi}) for size {size}."
            )
    config = [(0, 0)] * x.ndim
    for axis, pad in zip(layout.spatial_axes, pads, strict=True):
        config[axis] = pad
    return jnp.pad(x, config, mode=_NUMPY_PAD_MODES[padding_mode]), ((0, 0),) * layout.n


def _conv_geometry(fname: str, lay: _Layout, stride, padding, dilation):
    """Per-axis stride, dilation and (lo, hi) padding, the window checked against the input."""
    stride = per_axis(fname, "stride", stride, lay.n)
    dilation = per_axis(fname, "dilation", dilation, lay.n)
    pads = resolve_padding(
        fname,
        padding,
        lay.n,
        kernel=lay.kernel,
        stride=stride,
        dilation=dilation,
        in_sizes=lay.sizes,
        allowed=("VALID", "SAME", "FULL"),
    )
    rows = zip(lay.sizes, lay.kernel, stride, pads, dilation, strict=True)
    for axis, args in enumerate(rows):
        try:
            pool_output_size_1d(fname, *args, False, arg="w", axis=axis)
        except ValueError as err:
            raise ValueError(f"{err} {_reading(lay)}") from None
    return stride, dilation, pads


def _reading(lay: _Layout) -> str:
    """How ``x`` was split, for errors: its spatial rank comes from ``w``'s."""
    return (
        f"(`w` has {lay.n} spatial axes, so `x` reads as batch {lay.batch_shape}, spatial "
        f"{lay.sizes} and {lay.channels} channels.)"
    )


def conv(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    padding_mode: str = "zeros",
    bias: jax.typing.ArrayLike | None = None,
    data_format: str = "channels_last",
    precision: PrecisionArg = None,
) -> jax.Array:
    """N-d convolution (cross-correlation, as in PyTorch and lax) with ``n = w.ndim - 2``.

    ``out[b, o, c] = bias[c] + sum_{j, i} x_padded[b, o*stride + j*dilation, g*C_in/groups + i]
    * w[j, i, c]`` with ``g = c // (C_out/groups)``.

    Args:
      x: ``(*batch, *spatial, C_in)`` for channels_last, ``(*batch, C_in, *spatial)`` for
        channels_first; ``*batch`` may be empty or several axes.
      w: ``(*kernel, C_in // groups, C_out)`` for channels_last (HWIO), ``(C_out, C_in // groups,
        *kernel)`` for channels_first (PyTorch's OIHW). Same dtype as ``x``.
      stride: int or one per spatial axis.
      padding: int, per-axis ints, per-axis ``(lo, hi)`` pairs, "VALID", "SAME" (the odd element
        on the high side) or "FULL" (``d*(k-1)`` on both sides).
      dilation: kernel dilation, int or per axis.
      groups: feature groups; ``groups == C_in`` with ``C_out = m*C_in`` is depthwise.
      padding_mode: "zeros", "reflect", "replicate" or "circular" (PyTorch's modes and limits).
      bias: ``(C_out,)`` or None. float16/bfloat16: the convolution's float32 result plus the
        bias, rounded once (as PyTorch).
      data_format: "channels_last" or "channels_first".
      precision: passed to ``lax.conv_general_dilated``: None (XLA's default, TensorFloat-32
        products for float32 on recent NVIDIA GPUs), a ``lax.Precision`` or its name ("highest"
        for full float32), or a pair for ``x`` and ``w``. (A depthwise convolution on the CPU
        multiplies at full precision in any case, 16-bit inputs in float32.)

    Returns:
      ``(*batch, *out_spatial, C_out)`` (or channels first) of ``x``'s dtype, ``out_spatial`` as
      in :func:`jaxconv.conv_output_size`.

    Supports jit, vmap, grad (x, w, bias), jvp and higher orders (hessian): it is a composition of
    lax primitives with their own derivative rules (a depthwise one on the CPU: a ``custom_jvp``
    whose tangent is again a sum of slices). float16, bfloat16, float32, float64.

    A depthwise ``w`` (``groups == C_in > 1``, at most 49 taps, any multiplier ``m``) runs on the
    CPU as a sum of the kernel's taps, each a slice of ``x`` times its weights: XLA's grouped
    convolution does ``C_in`` times the work there. Other grouped convolutions (up to 64
    groups) run on the CPU as one dense convolution per group, and an ungrouped 1x1 kernel as a
    matrix product. README.md (Derivative rules, Benchmarks) gives the timings.

    Example:
      >>> x = jnp.ones((2, 8, 8, 3))
      >>> w = jnp.ones((3, 3, 3, 16))
      >>> conv(x, w, padding="SAME").shape
      (2, 8, 8, 16)
    """
    fname = "conv"
    precision = _check_precision(fname, precision)
    x, w, bias = _check_arrays(fname, "x", x, w, bias)
    lay = _layout(fname, "x", x, w, data_format)
    groups = _check_groups(fname, "x", groups, lay.channels, lay.w_in, lay.w_out)
    _check_bias(fname, bias, lay.w_out)
    stride, dilation, pads = _conv_geometry(fname, lay, stride, padding, dilation)
    xb = _one_batch_axis(x, lay.batch_shape)
    xb, pads = _pad_mode(fname, xb, lay, pads, padding_mode)
    # Padding that XLA's CPU backend would mishandle in the gradient is applied explicitly.
    xb, pads = pad_explicitly(xb, lay, stride, pads, dilation)
    geometry = (stride, dilation, pads)
    out = _convolve(xb, w, lay, groups, geometry, precision, bias_dtype(x.dtype, bias))
    out = _add_bias(out, bias, lay.channel_axis, x.dtype)
    return _restore_batch(out, lay.batch_shape)


def _convolve(xb, w, lay: _Layout, groups: int, geometry, precision, out_dtype):
    """XLA's convolution, or on the CPU the forms that run faster there: a sum of taps for
    depthwise kernels (:mod:`jaxconv._src.depthwise`), one dense convolution per group for other
    grouped ones (:mod:`jaxconv._src.grouped`), a matrix product for 1x1 kernels without padding
    (:mod:`jaxconv._src.pointwise`). ``out_dtype``: the result's, None for the input's."""
    stride, dilation, pads = geometry
    xla_conv = functools.partial(
        lax.conv_general_dilated,
        window_strides=stride,
        padding=pads,
        rhs_dilation=dilation,
        dimension_numbers=lay.dimension_numbers(),
        feature_group_count=groups,
        precision=precision,
        preferred_element_type=out_dtype,
    )
    last = lay.data_format == "channels_last"
    if is_depthwise(groups, lay.channels, lay.w_in, lay.kernel):
        sizes = tuple(xb.shape[a] for a in lay.spatial_axes)
        plans = depthwise_plans(lay.spatial_axes, sizes, lay.kernel, stride, dilation, pads)
        return depthwise_conv(xb, w, plans, lay.channel_axis, last, xla_conv, out_dtype)
    if split_groups(groups):
        w_out_axis = lay.n + 1 if last else 0
        return grouped_conv(xb, w, groups, (lay.channel_axis, w_out_axis), xla_conv)
    if is_pointwise(groups, lay.kernel, pads):
        return pointwise_conv(xb, w, stride, last, precision, xla_conv, out_dtype)
    return xla_conv(xb, w)

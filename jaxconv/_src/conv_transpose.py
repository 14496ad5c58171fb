"""Transposed convolution: the exact adjoint of :func:`jaxconv.conv` in ``x``.

``conv_transpose`` is the adjoint (transpose) of ``conv`` with respect to ``x``: it dilates its
input by the stride, pads it by ``d*(k-1) - lo`` and ``d*(k-1) - hi + r`` (``r`` the part of the
conv's padded input its windows never reach, i.e. ``output_padding``) and convolves with the
spatially flipped kernel whose in/out channel roles are swapped (per group). Its derivative in
``w`` is ``conv``'s (a ``jax.custom_jvp``, see :func:`_adjoint_conv`).
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxconv._src.args import is_int, per_axis
from jaxconv._src.arithmetic import transpose_geometry
from jaxconv._src.conv import (
    PrecisionArg,
    _add_bias,
    _check_arrays,
    _check_bias,
    _check_precision,
    _Layout,
    _layout,
    _one_batch_axis,
    _restore_batch,
    bias_dtype,
    conv,
)
from jaxconv._src.conv_workarounds import adjoint_padding, crop
from jaxconv._src.grouped import grouped_conv, split_groups


def _check_transpose_groups(fname: str, groups, lay: _Layout) -> int:
    if not is_int(groups):
        raise TypeError(f"{fname}: `groups` must be an int, got {groups!r}.")
    if groups < 1:
        raise ValueError(f"{fname}: `groups` must be >= 1, got {groups}.")
    if lay.channels != lay.w_out:
        raise ValueError(
            f"{fname}: `y` must have the {lay.w_out} channels of the convolution's output "
            f"(the out-channel axis of `w`), got {lay.channels}."
        )
    if lay.w_out % groups:
        raise ValueError(
            f"{fname}: the {lay.w_out} channels of `y` are not divisible by groups={groups}."
        )
    return int(groups)


def _transpose_geometry(fname, lay: _Layout, padding, stride, dilation, output_padding):
    """Output sizes and the (lo, hi) padding of the adjoint's dilated convolution."""
    outs = lay.sizes
    pads, sizes = transpose_geometry(
        fname, outs, lay.kernel, stride, padding, output_padding, dilation
    )
    tpads = []
    for i, o, k, s, d, (lo, hi) in zip(
        sizes, outs, lay.kernel, stride, dilation, pads, strict=True
    ):
        span = d * (k - 1)
        rest = i + lo + hi - span - 1 - (o - 1) * s  # padded input no window of the conv reaches
        tpads.append((span - lo, span - hi + rest))
    return tuple(tpads), tuple(pads)


def _transpose_kernel(w, lay: _Layout, groups: int):
    """``w`` flipped in space, regrouped so that its in/out roles can be swapped per group."""
    n = lay.n
    last = lay.data_format == "channels_last"
    w = lax.rev(w, tuple(range(n)) if last else tuple(range(2, n + 2)))
    if groups == 1:
        return w
    o_per, i_per = lay.w_out // groups, lay.w_in
    k = lay.kernel
    if last:  # (*k, I/g, O) -> (*k, I/g, g, O/g) -> (*k, g, I/g, O/g) -> (*k, C_in, O/g)
        w = w.reshape((*k, i_per, groups, o_per))
        w = jnp.swapaxes(w, n, n + 1)
        return w.reshape((*k, groups * i_per, o_per))
    # (O, I/g, *k) -> (g, O/g, I/g, *k) -> (O/g, g, I/g, *k) -> (O/g, C_in, *k)
    w = w.reshape((groups, o_per, i_per, *k))
    w = jnp.swapaxes(w, 0, 1)
    return w.reshape((o_per, groups * i_per, *k))


def conv_transpose(
    y: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    *,
    stride=1,
    padding=0,
    output_padding=0,
    dilation=1,
    groups: int = 1,
    bias: jax.typing.ArrayLike | None = None,
    data_format: str = "channels_last",
    precision: PrecisionArg = None,
) -> jax.Array:
    """Transposed convolution: the exact adjoint of :func:`conv` with the same ``w`` and arguments.

    ``conv_transpose(g, w, **kw) == jax.vjp(lambda x: conv(x, w, **kw), x)[1](g)[0]`` for ``x`` of
    the output shape below (zero padding); with channels_first this is PyTorch's
    ``F.conv_transpose{1,2,3}d(g, w, ...)`` with the very same ``(C_out, C_in // groups, *kernel)``
    tensor. The seed's dE/dA is ``conv_transpose(ones((3, 3, 1)), B[..., None, None])``.

    Args:
      y: ``(*batch, *spatial, C_out)`` (channels_last) or ``(*batch, C_out, *spatial)``: shaped
        like an output of ``conv``; ``*batch`` may be empty or several axes.
      w: the convolution's weight, ``(*kernel, C_in // groups, C_out)`` for channels_last,
        ``(C_out, C_in // groups, *kernel)`` for channels_first. Same dtype as ``y``.
      stride, dilation: the convolution's, int or per axis.
      padding: the convolution's zero padding: int, per-axis ints, ``(lo, hi)`` pairs, "VALID",
        "FULL" (``d*(k-1)`` both sides), or "SAME": the adjoint of a "SAME" convolution of an input
        of size ``size * stride`` (the output size then is ``size * stride``).
      output_padding: extra output size on the high side, int or per axis, smaller than the stride
        or the dilation (it picks which input size the adjoint is for; must be 0 with "SAME").
      groups: the convolution's feature groups.
      bias: ``(C_in,)`` (one per output channel of this function) or None. float16/bfloat16:
        added to the float32 result, which is rounded once (as PyTorch).
      data_format: "channels_last" or "channels_first".
      precision: as in :func:`conv`.

    Returns:
      ``(*batch, *out_spatial, C_in)`` (or channels first), ``out_spatial`` as in
      :func:`jaxconv.conv_transpose_output_size`: ``(I-1)*S - lo - hi + d*(K-1) +
      output_padding + 1``.

    Supports jit, vmap, grad (y, w, bias), jvp and higher orders (hessian). float16, bfloat16,
    float32, float64. The derivative in ``w`` on the CPU is ``conv``'s derivative in ``w``, by
    the adjoint identity ``<conv_transpose(y, w), g> = <y, conv(g, w)>``: XLA's own rule there
    reverses the kernel window, which its CPU backend runs as a slow loop (README.md,
    Benchmarks: 3x3 stride 2 on float32 NHWC (8, 28, 28, 64), forward plus backward).

    Example:
      >>> y = jnp.ones((1, 4, 4, 16))
      >>> w = jnp.ones((3, 3, 8, 16))
      >>> conv_transpose(y, w, stride=2, padding=1, output_padding=1).shape
      (1, 8, 8, 8)
    """
    fname = "conv_transpose"
    precision = _check_precision(fname, precision)
    y, w, bias = _check_arrays(fname, "y", y, w, bias)
    lay = _layout(fname, "y", y, w, data_format)
    groups = _check_transpose_groups(fname, groups, lay)
    _check_bias(fname, bias, lay.w_in * groups)
    stride = per_axis(fname, "stride", stride, lay.n)
    dilation = per_axis(fname, "dilation", dilation, lay.n)
    output_padding = per_axis(fname, "output_padding", output_padding, lay.n, minimum=0)
    tpads, pads = _transpose_geometry(fname, lay, padding, stride, dilation, output_padding)
    yb = _one_batch_axis(y, lay.batch_shape)
    tpads, crops = adjoint_padding(tpads, lay, stride, dilation)
    out_dtype = bias_dtype(y.dtype, bias)
    geometry = _Transposed(lay, stride, dilation, pads, tpads, crops, groups, precision, out_dtype)
    out = _adjoint_conv(yb, w, geometry)
    out = _add_bias(out, bias, lay.channel_axis, y.dtype)
    return _restore_batch(out, lay.batch_shape)


class _Transposed(NamedTuple):
    """A transposed convolution: the convolution's geometry and that of its adjoint."""

    lay: _Layout
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]  # the convolution's
    tpads: tuple[tuple[int, int], ...]  # the dilated convolution's
    crop: tuple[tuple[int, int], ...]  # of the dilated convolution's output
    groups: int
    precision: Any
    out_dtype: Any  # the result's (see conv.bias_dtype); None: the inputs'


def _dilated_conv(yb, w, geo: _Transposed):
    """The transposed convolution as XLA's input-dilated convolution (grouped: per group on the
    CPU, :mod:`jaxconv._src.grouped`)."""
    lay = geo.lay
    xla_conv = functools.partial(
        lax.conv_general_dilated,
        window_strides=(1,) * lay.n,
        padding=geo.tpads,
        lhs_dilation=geo.stride,
        rhs_dilation=geo.dilation,
        dimension_numbers=lay.dimension_numbers(transpose=True),
        feature_group_count=geo.groups,
        precision=geo.precision,
        preferred_element_type=geo.out_dtype,
    )
    wt = _transpose_kernel(w, lay, geo.groups)
    if split_groups(geo.groups):
        w_out_axis = lay.n if lay.data_format == "channels_last" else 1  # swapped roles
        out = grouped_conv(yb, wt, geo.groups, (lay.channel_axis, w_out_axis), xla_conv)
    else:
        out = xla_conv(yb, wt)
    return crop(out, lay.spatial_axes, geo.crop)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _adjoint_conv(yb, w, geo: _Transposed):
    """:func:`_dilated_conv` with a derivative in ``w`` that XLA's CPU backend runs fast.

    XLA transposes the input-dilated convolution in ``w`` into a convolution with window
    dilation, which its CPU backend runs as a slow loop: 3x3 stride 2 on float32 NHWC
    (8, 28, 28, 64) -> 56x56, 133 ms against PyTorch's 3.5 ms for the whole forward plus
    backward. Since this is the adjoint of ``conv(., w)``, ``<out, g> = <y, conv(g, w)>``: the
    derivative in ``w`` is ``conv``'s own derivative in ``w`` for input ``g`` and cotangent ``y``
    (3.4 ms). The tangent in ``w`` is written as the transpose of that map, so reverse mode
    transposes it back. GPUs keep XLA's form (``lax.platform_dependent``).
    """
    return _dilated_conv(yb, w, geo)


def _weight_tangent(yb, w, tw, geo: _Transposed, out_shape):
    lay = geo.lay
    kw = dict(stride=geo.stride, padding=geo.pads, dilation=geo.dilation, groups=geo.groups)
    kw.update(data_format=lay.data_format, precision=geo.precision)

    def conv_weight_vjp(g):  # g -> d<yb, conv(g, w)>/dw, linear in g
        out, pullback = jax.vjp(lambda w: conv(g, w, **kw), w)
        # With output_padding >= stride (dilated kernels) the convolution has outputs past y's
        # end, which the transposed convolution leaves out: y is zero there.
        config = [(0, 0, 0)] * out.ndim
        for axis in lay.spatial_axes:
            config[axis] = (0, out.shape[axis] - yb.shape[axis], 0)
        return pullback(lax.pad(yb, jnp.zeros((), yb.dtype), config))[0]

    g_spec = jax.ShapeDtypeStruct(out_shape, yb.dtype)

    def cpu(tw):
        return jax.linear_transpose(conv_weight_vjp, g_spec)(tw)[0].astype(geo.out_dtype or w.dtype)

    def xla_form(tw):
        return _dilated_conv(yb, tw, geo)

    conv_shape = jax.eval_shape(lambda g: conv(g, w, **kw), g_spec).shape
    if _group_window_tangent(geo, conv_shape):
        return xla_form(tw)
    return lax.platform_dependent(tw, cpu=cpu, default=xla_form)


def _group_window_tangent(geo: _Transposed, conv_shape) -> bool:
    """Whether the transpose of ``conv_weight_vjp`` has an axis of the form XLA's CPU compiler
    aborts on (:mod:`jaxconv._src.conv_workarounds`): its window is the convolution's output
    length, its base dilation the dilation, so an axis with stride 1, dilation 2 and 2 outputs.
    Such tiny axes take XLA's own form, whose weight derivative is a window-dilated
    convolution."""
    axes = zip(geo.lay.spatial_axes, geo.stride, geo.dilation, strict=True)
    return any(s == 1 and d == 2 and conv_shape[a] == 2 for a, s, d in axes)


def _adjoint_conv_jvp(geo, primals, tangents):
    (yb, w), (ty, tw) = primals, tangents
    out = _adjoint_conv(yb, w, geo)
    terms = []
    if not isinstance(ty, SymbolicZero):
        terms.append(_dilated_conv(ty, w, geo))
    if not isinstance(tw, SymbolicZero):
        terms.append(_weight_tangent(yb, w, tw, geo, out.shape))
    return out, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(out)


_adjoint_conv.defjvp(_adjoint_conv_jvp, symbolic_zeros=True)

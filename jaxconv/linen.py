"""``flax.linen`` modules for jaxconv's convolution and pooling functions.

Each module stores its configuration (and parameters) and calls the jaxconv function of the same
name; every argument means exactly what it means there. Constructor arguments follow the function's,
in the same order, without ``x``; the convolution modules follow ``flax.linen.Conv`` /
``flax.linen.ConvTranspose`` (``features``, ``kernel_size``, then the function's own arguments,
``use_bias``, ``dtype``, ``param_dtype``, ``kernel_init``, ``bias_init``), with Flax's default
initialisers (LeCun normal kernel, zero bias). Unlike Flax, ``padding`` defaults to ``0`` as in
``jaxconv.conv`` and PyTorch, and the number of spatial axes comes from ``len(kernel_size)``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxconv import linen as jcl
    >>> layer = jcl.Conv(features=8, kernel_size=(3, 3), padding=1)
    >>> x = jnp.ones((2, 8, 8, 1))
    >>> params = layer.init(jax.random.key(0), x)
    >>> layer.apply(params, x).shape
    (2, 8, 8, 8)

Modules run under ``jax.jit`` and differentiate with ``jax.grad`` (parameters and input) as
their functions do.
Requires the ``flax`` extra (``pip install jaxconv[flax]``).
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

import jaxconv
from jaxconv._src import layers
from jaxconv._src.args import check_bool

__all__ = [
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
    "AvgPool",
    "Conv",
    "ConvTranspose",
    "FractionalMaxPool",
    "LPPool",
    "MaxPool",
    "learned_p",
]

Initializer = Callable[..., jax.Array]
Padding = Any


def _conv_variables(module: nn.Module, x: jax.Array, *, transpose: bool):
    """Declare the kernel (and bias) of a conv layer; ``x``, kernel, bias in one dtype."""
    fname = f"jaxconv.linen.{type(module).__name__}"
    in_features = layers.conv_in_features(fname, x, module.kernel_size, module.data_format)
    shape = layers.kernel_shape(
        fname,
        module.kernel_size,
        in_features,
        module.features,
        module.groups,
        module.data_format,
        transpose=transpose,
        names=("the channel count of `x`", "`features`"),
    )
    init = layers.kernel_init(
        module.kernel_init, module.data_format, transpose=transpose, groups=module.groups
    )
    layers.check_dtypes(fname, module.dtype, module.param_dtype)
    kernel = module.param("kernel", init, shape, module.param_dtype)
    bias = None
    if check_bool(fname, "use_bias", module.use_bias):
        bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype)
    return promote_dtype(x, kernel, bias, dtype=module.dtype)


class Conv(nn.Module):
    """N-d convolution layer over :func:`jaxconv.conv`.

    Attributes:
        features: output channels ``C_out``.
        kernel_size: one int per spatial axis, e.g. ``(3, 3)``.
        stride, padding, dilation, groups, padding_mode, data_format, precision: as in
            :func:`jaxconv.conv`.
        use_bias: add a learned ``(C_out,)`` bias.
        dtype: computation dtype (default: promoted from the input and the parameters).
        param_dtype: parameter dtype.
        kernel_init, bias_init: initialisers; ``None`` kernel_init is LeCun normal with the fan-in
            over the kernel and the input channels (Flax's default). ``kernel_init`` is called
            with the channels_last shape ``(*kernel_size, C_in // groups, C_out)``, the layout
            Flax's initialisers assume, and its result transposed for channels_first.

    Input ``(*batch, *spatial, C_in)`` (channels_last) or ``(*batch, C_in, *spatial)``; the
    ``"kernel"`` parameter is ``(*kernel_size, C_in // groups, C_out)`` or ``(C_out,
    C_in // groups, *kernel_size)``, the layout :func:`jaxconv.conv` takes.
    """

    features: int
    kernel_size: Sequence[int]
    stride: int | Sequence[int] = 1
    padding: Padding = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1
    padding_mode: str = "zeros"
    data_format: str = "channels_last"
    precision: Any = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = _conv_variables(self, x, transpose=False)
        return jaxconv.conv(
            x,
            kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
            bias=bias,
            data_format=self.data_format,
            precision=self.precision,
        )


class ConvTranspose(nn.Module):
    """N-d transposed convolution layer over :func:`jaxconv.conv_transpose`.

    The exact adjoint of :class:`Conv` with the same kernel and arguments (PyTorch's
    ``ConvTranspose`` semantics). Attributes as :class:`Conv`, with ``output_padding`` and no
    ``padding_mode``. The ``"kernel"`` parameter is the one of the convolution it is the adjoint
    of: ``(*kernel_size, C_out // groups, C_in)`` channels_last, ``(C_in, C_out // groups,
    *kernel_size)`` channels_first (PyTorch's ``ConvTranspose`` weight layout); the default
    initialiser takes its fan-in over the kernel and ``C_in // groups``, and a ``kernel_init``
    is called with the channels_last shape in either layout.
    """

    features: int
    kernel_size: Sequence[int]
    stride: int | Sequence[int] = 1
    padding: Padding = 0
    output_padding: int | Sequence[int] = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1
    data_format: str = "channels_last"
    precision: Any = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = _conv_variables(self, x, transpose=True)
        return jaxconv.conv_transpose(
            x,
            kernel,
            stride=self.stride,
            padding=self.padding,
            output_padding=self.output_padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=bias,
            data_format=self.data_format,
            precision=self.precision,
        )


class MaxPool(nn.Module):
    """Max pooling layer over :func:`jaxconv.max_pool` (same arguments, same meaning)."""

    window: Sequence[int]
    stride: int | Sequence[int] | None = None
    padding: Padding = 0
    dilation: int | Sequence[int] = 1
    ceil_mode: bool = False
    return_indices: bool = False
    data_format: str = "channels_last"

    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
        return jaxconv.max_pool(
            x,
            self.window,
            self.stride,
            self.padding,
            dilation=self.dilation,
            ceil_mode=self.ceil_mode,
            return_indices=self.return_indices,
            data_format=self.data_format,
        )


class AvgPool(nn.Module):
    """Average pooling layer over :func:`jaxconv.avg_pool` (same arguments, same meaning)."""

    window: Sequence[int]
    stride: int | Sequence[int] | None = None
    padding: Padding = 0
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None
    data_format: str = "channels_last"

    def __call__(self, x: jax.Array) -> jax.Array:
        return jaxconv.avg_pool(
            x,
            self.window,
            self.stride,
            self.padding,
            ceil_mode=self.ceil_mode,
            count_include_pad=self.count_include_pad,
            divisor_override=self.divisor_override,
            data_format=self.data_format,
        )


class LPPool(nn.Module):
    """Lp pooling layer over :func:`jaxconv.lp_pool`, optionally with a learned ``p``.

    Attributes:
        p: the norm order (>= 1, ``float("inf")`` allowed); with ``learnable_p`` the initial value.
        window, stride, padding, dilation, ceil_mode, data_format: as in :func:`jaxconv.lp_pool`.
        learnable_p: learn ``p`` as the parameter ``"p_raw"`` with ``p = 1 + softplus(p_raw)``,
            so ``p >= 1`` whatever the optimiser does. :func:`learned_p` reads it back.
        param_dtype: dtype of ``p_raw``.
    """

    p: float
    window: Sequence[int]
    stride: int | Sequence[int] | None = None
    padding: Padding = 0
    dilation: int | Sequence[int] = 1
    ceil_mode: bool = False
    data_format: str = "channels_last"
    learnable_p: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.p
        if check_bool("jaxconv.linen.LPPool", "learnable_p", self.learnable_p):
            layers.check_dtypes("jaxconv.linen.LPPool", None, self.param_dtype)
            start = layers.p_to_raw("jaxconv.linen.LPPool", self.p, self.param_dtype)
            raw = self.param("p_raw", nn.initializers.constant(start), (), self.param_dtype)
            p = learned_p(raw)
        return jaxconv.lp_pool(
            x,
            p,
            self.window,
            self.stride,
            self.padding,
            dilation=self.dilation,
            ceil_mode=self.ceil_mode,
            data_format=self.data_format,
        )


def learned_p(p_raw: jax.Array) -> jax.Array:
    """The ``p`` an :class:`LPPool` with ``learnable_p=True`` uses, from its ``"p_raw"`` param."""
    return layers.raw_to_p(p_raw)


class AdaptiveAvgPool(nn.Module):
    """Adaptive average pooling over :func:`jaxconv.adaptive_avg_pool`."""

    output_size: Sequence[int | None]
    data_format: str = "channels_last"

    def __call__(self, x: jax.Array) -> jax.Array:
        return jaxconv.adaptive_avg_pool(x, self.output_size, data_format=self.data_format)


class AdaptiveMaxPool(nn.Module):
    """Adaptive max pooling over :func:`jaxconv.adaptive_max_pool`."""

    output_size: Sequence[int | None]
    return_indices: bool = False
    data_format: str = "channels_last"

    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
        return jaxconv.adaptive_max_pool(
            x,
            self.output_size,
            return_indices=self.return_indices,
            data_format=self.data_format,
        )


class FractionalMaxPool(nn.Module):
    """Fractional max pooling over :func:`jaxconv.fractional_max_pool`.

    Attributes:
        window, output_size, output_ratio, return_indices, data_format: as in
            :func:`jaxconv.fractional_max_pool`.
        deterministic: when True the pooling regions are fixed (every sample ``u`` is
            ``0.5``); when False each call draws a key from the ``rng_collection`` stream
            (``apply(..., rngs={"fractional": key})``). Set it here or in ``__call__`` (exactly
            one of the two, as ``flax.linen.Dropout``).
        rng_collection: name of the rng stream the random samples come from.
    """

    window: Sequence[int]
    output_size: int | Sequence[int] | None = None
    output_ratio: float | Sequence[float] | None = None
    return_indices: bool = False
    data_format: str = "channels_last"
    deterministic: bool | None = None
    rng_collection: str = "fractional"

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool | None = None
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        fname = "jaxconv.linen.FractionalMaxPool"
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if check_bool(fname, "deterministic", deterministic):
            source = {
                "samples": layers.deterministic_samples(fname, x, self.window, self.data_format)
            }
        else:
            source = {"key": self.make_rng(layers.check_collection(fname, self.rng_collection))}
        return jaxconv.fractional_max_pool(
            x,
            self.window,
            output_size=self.output_size,
            output_ratio=self.output_ratio,
            return_indices=self.return_indices,
            data_format=self.data_format,
            **source,
        )

"""``flax.nnx`` modules for jaxconv's convolution and pooling functions.

Each module stores its configuration (and parameters) and calls the jaxconv function of the same
name; every argument means exactly what it means there. Constructor arguments follow the function's,
in the same order, without ``x``; the convolution modules follow ``flax.nnx.Conv`` /
``flax.nnx.ConvTranspose`` (``in_features``, ``out_features``, ``kernel_size``, then the function's
own arguments, ``use_bias``, ``dtype``, ``param_dtype``, ``kernel_init``, ``bias_init``,
``rngs``), with Flax's default initialisers (LeCun normal kernel, zero bias). Unlike Flax,
``padding`` defaults to ``0`` as in ``jaxconv.conv`` and PyTorch, and the number of spatial axes
comes from ``len(kernel_size)``.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxconv import nnx as jcn
    >>> layer = jcn.Conv(1, 8, (3, 3), padding=1, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 8, 8, 1))).shape
    (2, 8, 8, 8)

Modules run under ``nnx.jit`` and differentiate with ``nnx.grad`` as their functions do.
Requires the ``flax`` extra (``pip install jaxconv[flax]``).
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

import jaxconv
from jaxconv._src import layers
from jaxconv._src.args import check_bool
from jaxconv._src.nnx_rngs import draw_key, kept_stream, rng_stream

__all__ = [
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
    "AvgPool",
    "Conv",
    "ConvTranspose",
    "FractionalMaxPool",
    "LPPool",
    "MaxPool",
]

Initializer = Callable[..., jax.Array]
Padding = Any
_zeros = nnx.initializers.zeros_init()


class _ConvBase(nnx.Module):
    """Kernel and bias of a conv layer, shared by :class:`Conv` and :class:`ConvTranspose`."""

    _transpose = False

    def _init_params(self, in_features, out_features, kernel_size, groups, data_format, *, opts):
        fname = f"jaxconv.nnx.{type(self).__name__}"
        shape = layers.kernel_shape(
            fname,
            kernel_size,
            in_features,
            out_features,
            groups,
            data_format,
            transpose=self._transpose,
        )
        init = layers.kernel_init(
            opts["kernel_init"], data_format, transpose=self._transpose, groups=groups
        )
        use_bias = check_bool(fname, "use_bias", opts["use_bias"])
        layers.check_dtypes(fname, opts["dtype"], opts["param_dtype"])
        if not isinstance(opts["rngs"], nnx.Rngs):
            raise TypeError(
                f"{fname}: `rngs` must be an nnx.Rngs (its `params` stream initialises the "
                f"kernel and bias), got {type(opts['rngs']).__name__}."
            )
        stream, param_dtype = rng_stream(fname, opts["rngs"], "params"), opts["param_dtype"]
        self.kernel = nnx.Param(init(stream(), shape, param_dtype))
        self.bias = nnx.data(None)
        if use_bias:
            self.bias = nnx.Param(opts["bias_init"](stream(), (out_features,), param_dtype))
        # the attributes flax.nnx.Conv has, for code that inspects layers
        self.in_features, self.out_features = in_features, out_features
        self.kernel_size, self.use_bias = tuple(kernel_size), use_bias
        self.dtype, self.param_dtype = opts["dtype"], param_dtype
        self.kernel_init, self.bias_init = init, opts["bias_init"]

    def _variables(self, x):
        bias = None if self.bias is None else self.bias[...]
        return promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)


class Conv(_ConvBase):
    """N-d convolution layer over :func:`jaxconv.conv`.

    Args:
        in_features: input channels ``C_in``.
        out_features: output channels ``C_out``.
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
        rngs: the ``params`` stream initialises the kernel and bias.

    The ``kernel`` is ``(*kernel_size, C_in // groups, C_out)`` (channels_last) or ``(C_out,
    C_in // groups, *kernel_size)``, the layout :func:`jaxconv.conv` takes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: Padding = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        *,
        data_format: str = "channels_last",
        precision: Any = None,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer | None = None,
        bias_init: Initializer = _zeros,
        rngs: nnx.Rngs,
    ):
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.padding_mode, self.data_format = groups, padding_mode, data_format
        self.precision = precision
        opts = dict(
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            rngs=rngs,
        )
        self._init_params(in_features, out_features, kernel_size, groups, data_format, opts=opts)

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = self._variables(x)
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


class ConvTranspose(_ConvBase):
    """N-d transposed convolution layer over :func:`jaxconv.conv_transpose`.

    The exact adjoint of :class:`Conv` with the same kernel and arguments (PyTorch's
    ``ConvTranspose`` semantics). Arguments as :class:`Conv`, with ``output_padding`` and no
    ``padding_mode``. The ``kernel`` is the one of the convolution it is the adjoint of:
    ``(*kernel_size, C_out // groups, C_in)`` channels_last, ``(C_in, C_out // groups,
    *kernel_size)`` channels_first (PyTorch's ``ConvTranspose`` weight layout); the default
    initialiser takes its fan-in over the kernel and ``C_in // groups``, and a ``kernel_init``
    is called with the channels_last shape in either layout.
    """

    _transpose = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: Padding = 0,
        output_padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        *,
        data_format: str = "channels_last",
        precision: Any = None,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer | None = None,
        bias_init: Initializer = _zeros,
        rngs: nnx.Rngs,
    ):
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.dilation, self.groups, self.data_format = dilation, groups, data_format
        self.precision = precision
        opts = dict(
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            rngs=rngs,
        )
        self._init_params(in_features, out_features, kernel_size, groups, data_format, opts=opts)

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = self._variables(x)
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


class MaxPool(nnx.Module):
    """Max pooling layer over :func:`jaxconv.max_pool` (same arguments, same meaning)."""

    def __init__(
        self,
        window: Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: Padding = 0,
        *,
        dilation: int | Sequence[int] = 1,
        ceil_mode: bool = False,
        return_indices: bool = False,
        data_format: str = "channels_last",
    ):
        self.window, self.stride, self.padding = window, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode
        self.return_indices, self.data_format = return_indices, data_format

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


class AvgPool(nnx.Module):
    """Average pooling layer over :func:`jaxconv.avg_pool` (same arguments, same meaning)."""

    def __init__(
        self,
        window: Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: Padding = 0,
        *,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
        data_format: str = "channels_last",
    ):
        self.window, self.stride, self.padding = window, stride, padding
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad
        self.divisor_override, self.data_format = divisor_override, data_format

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


class LPPool(nnx.Module):
    """Lp pooling layer over :func:`jaxconv.lp_pool`, optionally with a learned ``p``.

    Args:
        p: the norm order (>= 1, ``float("inf")`` allowed); with ``learnable_p`` the initial value.
        window, stride, padding, dilation, ceil_mode, data_format: as in :func:`jaxconv.lp_pool`.
        learnable_p: learn ``p`` as the parameter ``p_raw`` with ``p = 1 + softplus(p_raw)``, so
            ``p >= 1`` whatever the optimiser does; the property :attr:`p_value` reads it.
        param_dtype: dtype of ``p_raw``.
    """

    def __init__(
        self,
        p: float,
        window: Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: Padding = 0,
        *,
        dilation: int | Sequence[int] = 1,
        ceil_mode: bool = False,
        data_format: str = "channels_last",
        learnable_p: bool = False,
        param_dtype: Any = jnp.float32,
    ):
        self.p, self.window, self.stride, self.padding = p, window, stride, padding
        self.dilation, self.ceil_mode, self.data_format = dilation, ceil_mode, data_format
        self.p_raw = nnx.data(None)
        if check_bool("jaxconv.nnx.LPPool", "learnable_p", learnable_p):
            layers.check_dtypes("jaxconv.nnx.LPPool", None, param_dtype)
            start = layers.p_to_raw("jaxconv.nnx.LPPool", p, param_dtype)
            self.p_raw = nnx.Param(jnp.asarray(start, param_dtype))

    @property
    def p_value(self) -> float | jax.Array:
        """The ``p`` in use: the constructor's, or ``1 + softplus(p_raw)`` when learnable."""
        return self.p if self.p_raw is None else layers.raw_to_p(self.p_raw[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        return jaxconv.lp_pool(
            x,
            self.p_value,
            self.window,
            self.stride,
            self.padding,
            dilation=self.dilation,
            ceil_mode=self.ceil_mode,
            data_format=self.data_format,
        )


class AdaptiveAvgPool(nnx.Module):
    """Adaptive average pooling over :func:`jaxconv.adaptive_avg_pool`."""

    def __init__(self, output_size: Sequence[int | None], *, data_format: str = "channels_last"):
        self.output_size, self.data_format = output_size, data_format

    def __call__(self, x: jax.Array) -> jax.Array:
        return jaxconv.adaptive_avg_pool(x, self.output_size, data_format=self.data_format)


class AdaptiveMaxPool(nnx.Module):
    """Adaptive max pooling over :func:`jaxconv.adaptive_max_pool`."""

    def __init__(
        self,
        output_size: Sequence[int | None],
        *,
        return_indices: bool = False,
        data_format: str = "channels_last",
    ):
        self.output_size, self.return_indices = output_size, return_indices
        self.data_format = data_format

    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
        return jaxconv.adaptive_max_pool(
            x,
            self.output_size,
            return_indices=self.return_indices,
            data_format=self.data_format,
        )


class FractionalMaxPool(nnx.Module):
    """Fractional max pooling over :func:`jaxconv.fractional_max_pool`.

    Args:
        window, output_size, output_ratio, return_indices, data_format: as in
            :func:`jaxconv.fractional_max_pool`.
        deterministic: when True the pooling regions are fixed (every sample ``u`` is ``0.5``);
            when False each call draws a key from ``rngs``. ``model.eval()`` / ``model.train()``
            set it, and ``__call__`` may override it.
        rng_collection: the stream of an :class:`flax.nnx.Rngs` the keys come from.
        rngs: an :class:`flax.nnx.Rngs` or stream, kept for the calls (may instead be given to
            ``__call__``).
    """

    def __init__(
        self,
        window: Sequence[int],
        *,
        output_size: int | Sequence[int] | None = None,
        output_ratio: float | Sequence[float] | None = None,
        return_indices: bool = False,
        data_format: str = "channels_last",
        deterministic: bool = False,
        rng_collection: str = "fractional",
        rngs: nnx.Rngs | nnx.RngStream | None = None,
    ):
        self.window, self.output_size, self.output_ratio = window, output_size, output_ratio
        self.return_indices, self.data_format = return_indices, data_format
        fname = "jaxconv.nnx.FractionalMaxPool"
        self.deterministic = check_bool(fname, "deterministic", deterministic)
        self.rng_collection = layers.check_collection(fname, rng_collection)
        self.rngs = nnx.data(kept_stream(fname, rngs, rng_collection))

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view(model, deterministic=...)``, as ``nnx.Dropout``'s.

        Args:
          deterministic: if True, fixed pooling regions; if False, random ones.
        """
        if deterministic is not None:
            self.deterministic = check_bool(
                "jaxconv.nnx.FractionalMaxPool", "deterministic", deterministic
            )

    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        fname = "jaxconv.nnx.FractionalMaxPool"
        deterministic = self.deterministic if deterministic is None else deterministic
        if check_bool(fname, "deterministic", deterministic):
            source = {
                "samples": layers.deterministic_samples(fname, x, self.window, self.data_format)
            }
        else:
            source = {"key": draw_key(fname, rngs, self.rngs, self.rng_collection)}
        return jaxconv.fractional_max_pool(
            x,
            self.window,
            output_size=self.output_size,
            output_ratio=self.output_ratio,
            return_indices=self.return_indices,
            data_format=self.data_format,
            **source,
        )

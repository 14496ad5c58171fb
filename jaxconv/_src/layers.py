"""Framework-free pieces shared by the Flax wrappers (``jaxconv.linen`` and ``jaxconv.nnx``).

Kernel layouts and their default initialisers, the learnable-``p`` parameterisation of Lp
pooling, and the fixed fractional-pooling samples used when randomness is switched off. Nothing
here imports Flax, so both wrapper modules share one definition of each rule.
"""

import math

import jax
import jax.numpy as jnp
from jax.nn import initializers

from jaxconv._src.args import check_data_format, is_int, is_real, layout_axes, spatial_rank

DETERMINISTIC_SAMPLE = 0.5
"""The sample ``u`` every (batch, channel, axis) uses when fractional pooling is deterministic."""


def kernel_shape(
    fname: str,
    kernel_size,
    in_features: int,
    out_features: int,
    groups: int,
    data_format: str,
    *,
    transpose: bool,
    names: tuple[str, str] = ("`in_features`", "`out_features`"),
) -> tuple[int, ...]:
    """The weight shape ``jaxconv.conv`` / ``jaxconv.conv_transpose`` expect for a layer.

    ``conv``: ``(*k, in // groups, out)`` channels_last, ``(out, in // groups, *k)`` channels_first.
    ``conv_transpose`` uses the weight of the convolution it is the adjoint of (that convolution
    maps ``out`` features to ``in``): ``(*k, out // groups, in)`` / ``(in, out // groups, *k)``.
    ``names`` are what error messages call the two feature counts.
    """
    spatial_rank(fname, "kernel_size", kernel_size)
    kernel = tuple(kernel_size)
    if not all(is_int(k) and k >= 1 for k in kernel):
        raise ValueError(f"{fname}: `kernel_size` must contain ints >= 1, got {kernel_size!r}.")
    check_data_format(fname, data_format)
    for name, value in zip(names, (in_features, out_features), strict=True):
        if not is_int(value) or value < 1:
            raise ValueError(f"{fname}: {name} must be an int >= 1, got {value!r}.")
    if not is_int(groups) or groups < 1 or in_features % groups or out_features % groups:
        raise ValueError(
            f"{fname}: `groups` must be an int >= 1 dividing {names[0]} ({in_features}) and "
            f"{names[1]} ({out_features}), got {groups!r}."
        )
    conv_in, conv_out = (out_features, in_features) if transpose else (in_features, out_features)
    if data_format == "channels_last":
        return (*(int(k) for k in kernel), conv_in // groups, conv_out)
    return (conv_out, conv_in // groups, *(int(k) for k in kernel))


def kernel_init(init, data_format: str, *, transpose: bool, groups: int = 1):
    """The layer's kernel initialiser: ``init`` (``None``: Flax's default) called with the
    channels_last shape ``(*kernel, in, out)``, the layout Flax's initialisers assume (fan-in on
    axis -2, fan-out on axis -1), its result moved to ``(out, in, *kernel)`` for channels_first.
    So any Flax initialiser has the variance it has in Flax in either layout, and the default
    kernel of a channels_first layer is the channels_last one's, transposed.

    The default is LeCun normal with the fan-in over the input features each output reads:
    ``prod(kernel) * in_features // groups``, as ``flax.linen.Conv`` for ``conv``.
    ``conv_transpose``'s kernel ``(*kernel, out // groups, in)`` holds all ``in_features`` on its
    last axis, so its fan-in axis is that one, and its variance is scaled by ``groups``.
    """
    if init is None:
        in_axis, out_axis, scale = (-1, -2, float(groups)) if transpose else (-2, -1, 1.0)
        init = initializers.variance_scaling(
            scale, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
        )
    if data_format == "channels_last":
        return init

    def channels_first(key, shape, dtype=jnp.float32):
        n = len(shape) - 2
        kernel = init(key, (*shape[2:], shape[1], shape[0]), dtype)
        return jnp.transpose(kernel, (n + 1, n, *range(n)))

    return channels_first


def check_dtypes(fname: str, dtype, param_dtype) -> None:
    """``dtype`` None or a floating dtype, ``param_dtype`` a floating dtype."""
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is None and name == "dtype":
            continue
        try:
            floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise TypeError(
                f"{fname}: `{name}` must be a floating dtype (e.g. jnp.float32, jnp.bfloat16)"
                f"{' or None' if name == 'dtype' else ''}, got {value!r}."
            )


def check_collection(fname: str, name) -> str:
    """An rng stream / collection name."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"{fname}: `rng_collection` must be a non-empty str, got {name!r}.")
    return name


def p_to_raw(fname: str, p, param_dtype) -> float:
    """The unconstrained value ``raw`` with ``1 + softplus(raw) == p`` (``p > 1`` finite), which
    ``param_dtype`` must hold (``raw`` is about ``p - 1`` for large ``p``).

    ``p == 1`` sits at ``raw = -inf``; it is started at ``1 + 1e-6`` instead.
    """
    if not is_real(p) or not math.isfinite(p) or p < 1:
        raise ValueError(
            f"{fname}: a learnable `p` must start at a finite Python number >= 1, got {p!r}."
        )
    excess = max(float(p) - 1.0, 1e-6)
    raw = excess + math.log(-math.expm1(-excess))
    if raw > float(jnp.finfo(param_dtype).max):
        raise ValueError(
            f"{fname}: a learnable `p` of {p!r} is beyond what `param_dtype` "
            f"{jnp.dtype(param_dtype).name} holds (up to {float(jnp.finfo(param_dtype).max):g}); "
            f"start at a smaller `p` or use a wider `param_dtype`."
        )
    return raw


def raw_to_p(raw: jax.Array) -> jax.Array:
    """``p = 1 + softplus(raw)``: always >= 1, whatever the optimiser does to ``raw``."""
    return 1 + jax.nn.softplus(raw)


def deterministic_samples(fname: str, x: jax.Array, window, data_format: str) -> jax.Array:
    """Fractional-pooling samples ``(*batch, C, n)`` all equal to :data:`DETERMINISTIC_SAMPLE`."""
    x = jnp.asarray(x)
    n = spatial_rank(fname, "window", window)
    _, channel_axis = layout_axes(fname, x.ndim, n, data_format)
    lead = x.shape[: x.ndim - n - 1] if data_format == "channels_last" else x.shape[:channel_axis]
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return jnp.full((*lead, x.shape[channel_axis], n), DETERMINISTIC_SAMPLE, dtype)


def conv_in_features(fname: str, x: jax.Array, kernel_size, data_format: str) -> int:
    """The channel count of a convolution layer's input, validating its rank and layout."""
    n = spatial_rank(fname, "kernel_size", kernel_size)
    _, channel_axis = layout_axes(fname, jnp.ndim(x), n, data_format)
    return int(jnp.shape(x)[channel_axis])

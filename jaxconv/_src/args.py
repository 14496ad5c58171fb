"""Canonicalisation and validation of user arguments.

Every public function turns its static arguments into per-axis tuples here, once, and every error
message names the public function, the argument, what it got and what it expected.
"""

import math
import numbers
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

DATA_FORMATS = ("channels_last", "channels_first")
FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def is_int(value) -> bool:
    """True for Python and NumPy integers, False for bools and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """True for Python and NumPy real numbers (ints included), False for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def per_axis(fname: str, name: str, value, n: int, *, minimum: int = 1) -> tuple[int, ...]:
    """An int or a length-``n`` sequence of ints as a length-``n`` tuple, each ``>= minimum``."""
    if is_int(value):
        values = (int(value),) * n
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(
                f"{fname}: `{name}` must be an int or a sequence of {n} ints (one per spatial "
                f"axis), got {value!r} of length {len(value)}."
            )
        if not all(is_int(v) for v in value):
            raise TypeError(f"{fname}: `{name}` must contain ints, got {value!r}.")
        values = tuple(int(v) for v in value)
    else:
        raise TypeError(
            f"{fname}: `{name}` must be an int or a sequence of {n} ints, "
            f"got {value!r} of type {type(value).__name__}."
        )
    if any(v < minimum for v in values):
        raise ValueError(f"{fname}: every entry of `{name}` must be >= {minimum}, got {value!r}.")
    if any(v > INT64_MAX for v in values):
        raise ValueError(
            f"{fname}: every entry of `{name}` must be at most 2**63 - 1 (int64), got {value!r}."
        )
    return values


def spatial_rank(fname: str, name: str, value) -> int:
    """The number of spatial axes a window-like argument (int or sequence) names."""
    if is_int(value):
        raise TypeError(
            f"{fname}: `{name}` must be a sequence with one entry per spatial axis (e.g. (2, 2) "
            f"for 2-D), got the int {value!r}; the number of spatial axes comes from its length."
        )
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(
            f"{fname}: `{name}` must be a sequence with one entry per spatial axis, got "
            f"{value!r} of type {type(value).__name__}."
        )
    if len(value) == 0:
        raise ValueError(f"{fname}: `{name}` must name at least one spatial axis, got {value!r}.")
    return len(value)


def check_data_format(fname: str, data_format) -> str:
    if not isinstance(data_format, str) or data_format not in DATA_FORMATS:
        raise ValueError(
            f"{fname}: `data_format` must be one of {DATA_FORMATS}, got {data_format!r}."
        )
    return data_format


def layout_axes(fname: str, ndim: int, n: int, data_format: str) -> tuple[tuple[int, ...], int]:
    """Spatial axes and the channel axis of an array with ``ndim`` axes and ``n`` spatial ones.

    channels_last: ``(*batch, *spatial, C)``; channels_first: ``(*batch, C, *spatial)``.
    """
    check_data_format(fname, data_format)
    if ndim < n + 1:
        layout = "(*batch, *spatial, C)"
        if data_format == "channels_first":
            layout = "(*batch, C, *spatial)"
        raise ValueError(
            f"{fname}: `x` must have at least {n + 1} axes, {layout} with {n} spatial axes, "
            f"got an array with {ndim} axes."
        )
    if data_format == "channels_last":
        return tuple(range(ndim - n - 1, ndim - 1)), ndim - 1
    return tuple(range(ndim - n, ndim)), ndim - n - 1


def as_array(fname: str, name: str, x) -> jnp.ndarray:
    """``x`` (an array or anything ``jnp.asarray`` takes) as a JAX array."""
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError, OverflowError) as err:
        shown = repr(x) if len(repr(x)) <= 60 else repr(x)[:57] + "..."
        raise TypeError(
            f"{fname}: `{name}` must be an array (or a nested sequence of numbers), got {shown} "
            f"of type {type(x).__name__}."
        ) from err


def check_floating(fname: str, name: str, x) -> jnp.ndarray:
    """``x`` as a JAX array of a floating dtype, never weak-typed (so that every op's result
    has ``x``'s dtype in promotion too; a no-op for other arrays)."""
    x = as_array(fname, name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fname}: `{name}` must be a floating-point array (float16, bfloat16, float32 or "
            f"float64), got dtype {x.dtype}."
        )
    return x.astype(x.dtype)


def check_index_volume(fname: str, sizes: tuple[int, ...], return_indices: bool) -> None:
    """Indices are int32 flat positions: with ``return_indices`` the spatial volume must fit."""
    if return_indices and math.prod(sizes) > INT32_MAX:
        raise ValueError(
            f"{fname}: `return_indices=True` needs a spatial volume of at most {INT32_MAX} "
            f"elements (int32 indices), got spatial sizes {tuple(sizes)}."
        )


def check_bool(fname: str, name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fname}: `{name}` must be a bool, got {value!r}.")
    return bool(value)

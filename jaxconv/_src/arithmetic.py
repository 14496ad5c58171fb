"""Output sizes and padding resolution, per spatial axis.

The seed's formula ``O = floor((I + 2P - K) / S) + 1`` generalised to asymmetric padding
``(lo, hi)``, dilation ``d`` and ceil mode (PyTorch's ``aten/src/ATen/native/Pool.h``)::

    O = floor((I + lo + hi - d*(K-1) - 1 + (S-1 if ceil else 0)) / S) + 1
    if ceil and (O-1)*S >= I + lo: O -= 1     # the last window must start inside the input
"""

from collections.abc import Sequence
from typing import Any

from jaxconv._src.args import check_bool, is_int, per_axis

PADDING_STRINGS = ("VALID", "SAME", "FULL")


def _is_pair(value) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(is_int(v) for v in value)
    )


def _string_padding(fname, padding, in_sizes, kernel, stride, dilation, allowed):
    mode = padding.upper()
    if mode not in allowed:
        raise ValueError(
            f"{fname}: `padding` as a string must be one of {allowed}, got {padding!r}."
        )
    if mode == "VALID":
        return ((0, 0),) * len(kernel)
    if mode == "FULL":
        return tuple((d * (k - 1),) * 2 for k, d in zip(kernel, dilation, strict=True))
    if in_sizes is None:
        raise ValueError(f"{fname}: `padding='SAME'` needs the input size.")
    pads = []
    for i, k, s, d in zip(in_sizes, kernel, stride, dilation, strict=True):
        out = -(-i // s)
        total = max((out - 1) * s + d * (k - 1) + 1 - i, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def resolve_padding(
    fname: str,
    padding,
    n: int,
    *,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    in_sizes: tuple[int, ...] | None = None,
    allowed: tuple[str, ...] = ("VALID", "SAME"),
) -> tuple[tuple[int, int], ...]:
    """Any accepted form of ``padding`` as ``n`` explicit ``(lo, hi)`` pairs of ints >= 0.

    Accepted: an int, ``n`` ints (symmetric per axis), ``n`` ``(lo, hi)`` pairs, or a string in
    ``allowed`` ("VALID", "SAME": lax semantics with the odd element high; "FULL": ``d*(k-1)`` both
    sides).
    """
    if isinstance(padding, str):
        return _string_padding(fname, padding, in_sizes, kernel, stride, dilation, allowed)
    if isinstance(padding, Sequence) and padding and all(_is_pair(p) for p in padding):
        if len(padding) != n:
            raise ValueError(
                f"{fname}: `padding` as (lo, hi) pairs needs {n} pairs (one per spatial axis), "
                f"got {padding!r}."
            )
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        if any(lo < 0 or hi < 0 for lo, hi in pads):
            raise ValueError(f"{fname}: `padding` must be >= 0, got {padding!r}.")
        return pads
    if not is_int(padding) and not (
        isinstance(padding, Sequence) and all(is_int(p) for p in padding)
    ):
        raise TypeError(
            f"{fname}: `padding` must be an int, {n} ints, {n} (lo, hi) pairs or one of "
            f"{allowed}, got {padding!r}."
        )
    if n == 1 and isinstance(padding, Sequence) and len(padding) == 2:
        raise ValueError(
            f"{fname}: `padding` must be an int, 1 int or 1 (lo, hi) pair for 1 spatial axis, "
            f"got {padding!r}; for low and high padding on that axis write ({padding!r},)."
        )
    return tuple((p, p) for p in per_axis(fname, "padding", padding, n, minimum=0))


def pool_output_size_1d(
    fname, in_size, kernel, stride, pad, dilation, ceil_mode, *, arg: str, axis: int
) -> int:
    """Output length along spatial axis ``axis``; raises, naming the argument ``arg`` that
    gives the kernel, if the window does not fit the padded input."""
    lo, hi = pad
    span = dilation * (kernel - 1) + 1
    room = in_size + lo + hi - span
    out = (room + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= in_size + lo:
        out -= 1
    if room < 0 and (out < 1 or not ceil_mode):
        raise ValueError(
            f"{fname}: `{arg}` gives a window (kernel {kernel}, dilation {dilation}, span "
            f"{span}) larger than the padded input on spatial axis {axis} ({in_size} + padding "
            f"{lo} + {hi} = {in_size + lo + hi}); the span must be at most that."
        )
    return out


def _rank(values) -> int | None:
    """The number of spatial axes implied by a list of arguments (None: all scalar)."""
    for v in values:
        if isinstance(v, Sequence) and not isinstance(v, str):
            return len(v)
    return None


def conv_output_size(
    size: int | Sequence[int],
    kernel: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Any = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
) -> int | tuple[int, ...]:
    """Output size of a convolution or pooling window along each spatial axis.

    ``O = floor((I + lo + hi - d*(K-1) - 1 + (S-1 if ceil_mode else 0)) / S) + 1``; in ceil mode
    the last window must start inside the input or the left padding (PyTorch's rule).

    Args:
      size: input size ``I``, an int or one per spatial axis.
      kernel: kernel size ``K``, int or per axis.
      stride: ``S``, int or per axis.
      padding: int, per-axis ints, per-axis ``(lo, hi)`` pairs, or "VALID" / "SAME" / "FULL".
      dilation: ``d``, int or per axis.
      ceil_mode: round the division up instead of down.

    Returns:
      An int when every argument is scalar, else a tuple with one size per spatial axis.

    Example:
      >>> conv_output_size(5, 3)
      3
      >>> conv_output_size((224, 224), 3, stride=2, padding=1)
      (112, 112)
    """
    fname = "conv_output_size"
    n = _rank([size, kernel, stride, dilation, padding])
    scalar = n is None
    n = n or 1
    if scalar and not is_int(padding) and not isinstance(padding, str):
        raise TypeError(f"{fname}: `padding` must be an int or a string, got {padding!r}.")
    sizes = per_axis(fname, "size", size, n, minimum=1)
    k = per_axis(fname, "kernel", kernel, n)
    s = per_axis(fname, "stride", stride, n)
    d = per_axis(fname, "dilation", dilation, n)
    pads = resolve_padding(
        fname, padding, n, kernel=k, stride=s, dilation=d, in_sizes=sizes, allowed=PADDING_STRINGS
    )
    ceil_mode = check_bool(fname, "ceil_mode", ceil_mode)
    out = tuple(
        pool_output_size_1d(fname, *a, ceil_mode, arg="kernel", axis=i)
        for i, a in enumerate(zip(sizes, k, s, pads, d, strict=True))
    )
    return out[0] if scalar else out


def conv_transpose_output_size(
    size: int | Sequence[int],
    kernel: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Any = 0,
    output_padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> int | tuple[int, ...]:
    """Output size of a transposed convolution along each spatial axis.

    ``O = (I - 1)*S - lo - hi + d*(K - 1) + output_padding + 1``, the input size of the
    convolution whose adjoint it is. ``output_padding`` must be smaller than the stride or the
    dilation (PyTorch's rule). ``padding`` as :func:`jaxconv.conv_transpose`: "SAME" gives
    ``I*S``, "FULL" pads the convolution by ``d*(K - 1)`` on both sides.

    Example:
      >>> conv_transpose_output_size(3, 3)
      5
      >>> conv_transpose_output_size((4, 4), 3, stride=2, padding=1, output_padding=1)
      (8, 8)
      >>> conv_transpose_output_size(16, 3, stride=2, padding="SAME")
      32
    """
    fname = "conv_transpose_output_size"
    n = _rank([size, kernel, stride, dilation, output_padding, padding])
    scalar = n is None
    n = n or 1
    sizes = per_axis(fname, "size", size, n, minimum=1)
    k = per_axis(fname, "kernel", kernel, n)
    s = per_axis(fname, "stride", stride, n)
    d = per_axis(fname, "dilation", dilation, n)
    op = per_axis(fname, "output_padding", output_padding, n, minimum=0)
    out = transpose_geometry(fname, sizes, k, s, padding, op, d)[1]
    return out[0] if scalar else out


def transpose_geometry(fname, sizes, kernel, stride, padding, output_padding, dilation):
    """The convolution's ``(lo, hi)`` padding and the transposed output sizes, validated.

    "SAME": the output is ``input * stride`` (the adjoint of a "SAME" convolution of it);
    "FULL": ``d*(k - 1)`` both sides; else as :func:`resolve_padding`.
    """
    n = len(sizes)
    if isinstance(padding, str) and padding.upper() == "SAME":
        if any(output_padding):
            raise ValueError(
                f"{fname}: with padding='SAME' the output size is input size * stride, so "
                f"`output_padding` must be 0, got {output_padding}."
            )
        outs = tuple(i * s for i, s in zip(sizes, stride, strict=True))
        pads = resolve_padding(
            fname, padding, n, kernel=kernel, stride=stride, dilation=dilation, in_sizes=outs
        )
        return pads, outs
    pads = resolve_padding(
        fname,
        padding,
        n,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        allowed=("VALID", "SAME", "FULL"),
    )
    return pads, transpose_sizes(fname, sizes, kernel, stride, pads, output_padding, dilation)


def transpose_sizes(fname, sizes, kernel, stride, pads, output_padding, dilation):
    """Per-axis transposed-convolution output sizes, validated."""
    out = []
    for i, k, s, (lo, hi), op, d in zip(
        sizes, kernel, stride, pads, output_padding, dilation, strict=True
    ):
        if op >= s and op >= d:
            raise ValueError(
                f"{fname}: `output_padding` must be smaller than the stride or the dilation, "
                f"got output_padding={op} with stride={s} and dilation={d}."
            )
        o = (i - 1) * s - lo - hi + d * (k - 1) + op + 1
        if o < 1:
            raise ValueError(
                f"{fname}: the output size would be {o} (input {i}, kernel {k}, stride {s}, "
                f"padding ({lo}, {hi}), dilation {d}); the padding is too large."
            )
        out.append(o)
    return tuple(out)

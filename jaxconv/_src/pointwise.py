"""1x1 convolutions on the CPU as one matrix product.

A convolution whose kernel is 1 on every spatial axis (ResNet's bottleneck and projection layers,
MobileNet's pointwise layers) multiplies every position's channels by the same ``(C_in, C_out)``
matrix. XLA's CPU backend runs it through its general convolution, and its derivatives through
convolutions with batch and feature axes swapped, which run slowly there: float32 NHWC
(8, 56, 56, 64) to 256 channels took 4.0 ms forward and 25 ms forward plus backward (for ``x``
and ``w``), where the same numbers as one ``dot_general`` took 2.0 and 7.7 ms (PyTorch
channels_last 1.7 and 7.2). So on the CPU a 1x1 convolution is a ``dot_general`` (its
padding, all beyond the kernel's span, is applied to ``x`` first, see
:mod:`jaxconv._src.conv_workarounds`). Channels last, the positions (batch and space) are
merged into rows; channels first, there is one product per batch element, with the kernel's
matrix broadcast over the batch. A stride first takes the strided slice. The derivatives are
JAX's for ``dot_general``: products again. 16-bit inputs are multiplied and summed in float32
and rounded once (bfloat16 forward 2.0 against 6.5 ms). The weight's derivative of the
broadcast would sum per-batch products already rounded to 16 bits (bfloat16 errors up to 9e-3
against PyTorch's 3.9e-3), so 16-bit channels first is one product over batch and positions
whose ``(C_out, N, P)`` result is transposed: (8, 64, 56, 56) to 256 channels bfloat16 forward
4.7-5.5 against 4.9-5.5 ms, forward plus backward the same; float32 keeps the broadcast, whose
forward took 4.8-5.1 against 7.2-7.5 ms.

GPUs keep XLA's convolution (``lax.platform_dependent``).
"""

import math

import jax.numpy as jnp
from jax import lax

_HALF = (jnp.float16, jnp.bfloat16)


def is_pointwise(groups: int, kernel, pads) -> bool:
    """An ungrouped convolution with a kernel of 1 on every axis and no padding left (a 1x1
    kernel's padding is applied to ``x`` before)."""
    return groups == 1 and all(k == 1 for k in kernel) and all(p == (0, 0) for p in pads)


def _product(a, b, dims, precision, out_dtype):
    """``dot_general``; 16-bit operands multiplied and summed in float32, rounded once (to
    ``out_dtype``, None for ``a``'s dtype)."""
    wide = jnp.float32 if a.dtype in _HALF else None
    out = lax.dot_general(a, b, dims, precision=precision, preferred_element_type=wide)
    return out.astype(out_dtype or a.dtype)


def _dense(x, w, stride, channels_last: bool, precision, out_dtype):
    """The 1x1 convolution of ``x`` (one batch axis) as a matrix product."""
    n = x.ndim - 2
    first = 1 if channels_last else 2
    if any(s > 1 for s in stride):
        strides = (1,) * first + tuple(stride) + (1,) * (x.ndim - first - n)
        x = lax.slice(x, (0,) * x.ndim, x.shape, strides)
    if channels_last:  # w: (1, ..., 1, C_in, C_out)
        c_in, c_out = w.shape[-2:]
        rows = math.prod(x.shape[:-1])
        out = _product(
            x.reshape(rows, c_in),
            w.reshape(c_in, c_out),
            (((1,), (0,)), ((), ())),
            precision,
            out_dtype,
        )
        return out.reshape((*x.shape[:-1], c_out))
    # channels first, w: (C_out, C_in, 1, ..., 1)
    batch, c_in, spatial = x.shape[0], x.shape[1], x.shape[2:]
    c_out = w.shape[0]
    flat = x.reshape(batch, c_in, math.prod(spatial))
    if x.dtype in _HALF:
        dims = (((1,), (1,)), ((), ()))
        out = _product(w.reshape(c_out, c_in), flat, dims, precision, out_dtype)
        return jnp.moveaxis(out, 0, 1).reshape((batch, c_out, *spatial))
    matrix = jnp.broadcast_to(w.reshape(c_out, c_in), (batch, c_out, c_in))
    out = _product(matrix, flat, (((2,), (1,)), ((0,), (0,))), precision, out_dtype)
    return out.reshape((batch, c_out, *spatial))


def pointwise_conv(x, w, stride, channels_last: bool, precision, xla_conv, out_dtype=None):
    """``xla_conv(x, w)`` for a 1x1 kernel without padding; a matrix product on the CPU.
    ``out_dtype``: the result's (``xla_conv``'s too), None for ``x``'s."""

    def cpu(x, w):
        return _dense(x, w, stride, channels_last, precision, out_dtype)

    return lax.platform_dependent(x, w, cpu=cpu, default=xla_conv)

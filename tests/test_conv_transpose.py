"""conv_transpose against PyTorch CPU: forward and gradients, the adjoint of conv, SAME output
sizes, padding beyond the kernel's span, derivatives of higher order."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conv_oracle import CF, CL
from conv_torch import compare_both_formats, conv_weight, seeded_rng, torch_conv_t
from jax.test_util import check_grads

from jaxconv import conv, conv_output_size, conv_transpose

# (input sizes of the transposed conv, kernel, C_out of conv (= channels of y), C_in of conv,
#  stride, padding, output_padding, dilation, groups, bias)
CONV_T_CASES = [
    ((6,), (3,), 2, 3, 2, 1, 1, 1, 1, True),
    ((5,), (4,), 3, 6, 3, 0, 2, 1, 3, False),
    ((7,), (3,), 2, 2, 1, 2, 1, 2, 1, True),  # output_padding >= stride, < dilation
    ((7,), (3,), 2, 2, 1, 3, 0, 1, 1, False),  # padding > d*(k-1): the adjoint crops
    ((5, 6), (3, 3), 2, 3, 2, 1, 1, 1, 1, True),
    ((4, 5), (3, 2), 4, 2, (2, 3), (0, 1), (1, 2), 1, 2, False),
    ((6, 5), (3, 3), 4, 4, 1, 0, 0, (2, 1), 4, True),
    ((5, 5), (2, 3), 4, 6, 2, 0, (0, 1), 2, 2, False),
    ((4, 4), (3, 3), 3, 2, 1, "FULL", 0, 1, 1, True),
    ((4, 3, 4), (3, 2, 3), 2, 3, 2, 1, 1, 1, 1, True),
    ((3, 4, 4), (2, 3, 2), 4, 2, (1, 2, 2), (0, 1, 0), (0, 1, 1), (2, 1, 1), 2, False),
]


@pytest.mark.parametrize("case", CONV_T_CASES, ids=lambda c: f"{len(c[0])}d-s{c[4]}-op{c[6]}")
def test_conv_transpose_matches_torch(case):
    sizes, kernel, c_y, c_out, stride, padding, out_pad, dilation, groups, has_bias = case
    rng = seeded_rng("conv_t", case)
    y = rng.standard_normal((2, c_y, *sizes)).astype(np.float32)
    w = rng.standard_normal((c_y, c_out // groups, *kernel)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32) if has_bias else None
    torch_padding = padding
    if padding == "FULL":  # the adjoint of a FULL conv: d*(k-1) on both sides
        dil = (dilation,) * len(kernel) if isinstance(dilation, int) else dilation
        torch_padding = tuple(d * (k - 1) for k, d in zip(kernel, dil, strict=True))
    args = dict(stride=stride, output_padding=out_pad, dilation=dilation, groups=groups)
    ref, g, grads = torch_conv_t(y, w, b, case, padding=torch_padding, **args)
    compare_both_formats(conv_transpose, y, w, b, ref, g, grads, padding=padding, **args)


ADJOINT_CASES = [
    # (n, data_format, stride, padding, output_padding, dilation, groups)
    (1, CL, 2, 1, 1, 1, 1),
    (1, CF, 1, "SAME", 0, 2, 2),
    (2, CL, 2, "SAME", 0, 1, 1),
    (2, CF, 3, "SAME", 0, (1, 2), 2),
    (2, CL, (2, 1), ((2, 0), (1, 3)), (1, 0), 1, 2),
    (2, CF, 1, "FULL", 0, 2, 1),
    (2, CL, 2, "VALID", 1, 1, 4),
    (3, CF, 2, (1, 0, 1), (1, 0, 1), 1, 2),
    (3, CL, 1, "SAME", 0, 1, 1),
]


@pytest.mark.parametrize("case", ADJOINT_CASES, ids=lambda c: f"{c[0]}d-{c[1]}-{c[3]}")
def test_conv_transpose_is_the_adjoint_of_conv(case):
    n, data_format, stride, padding, out_pad, dilation, groups = case
    rng = seeded_rng("adjoint", case)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    kw["data_format"] = data_format
    w = conv_weight(rng, n, data_format, 4, 4, groups)
    y_sizes = (6, 7, 4)[:n]
    y_shape = (2, 4, *y_sizes) if data_format == CF else (2, *y_sizes, 4)
    g = rng.standard_normal(y_shape)
    xt = jax.jit(functools.partial(conv_transpose, output_padding=out_pad, **kw))(g, w)
    x = rng.standard_normal(xt.shape)
    y, pullback = jax.vjp(lambda x: conv(x, w, **kw), x)
    chex.assert_shape(y, g.shape)  # conv maps the adjoint's output shape back to y's shape
    np.testing.assert_allclose(xt, pullback(g)[0], rtol=1e-12, atol=1e-12)
    # <conv(x), g> == <x, conv_transpose(g)>, independently of autodiff
    np.testing.assert_allclose(jnp.vdot(y, g), jnp.vdot(x, xt), rtol=1e-12)


def test_same_transpose_output_size():
    w = jnp.ones((3, 3, 2, 2), jnp.float32)
    y = jnp.ones((1, 5, 4, 2), jnp.float32)
    out = conv_transpose(y, w, stride=(2, 3), padding="SAME")
    chex.assert_shape(out, (1, 10, 12, 2))
    assert conv_output_size((10, 12), 3, stride=(2, 3), padding="SAME") == (5, 4)


def _torch_transpose_cropped(y, w, padding, tangent=None):
    """PyTorch's unpadded 2-D transposed convolution (stride 1) with ``(lo, hi)`` cropped off each
    axis: the adjoint of a convolution with that asymmetric padding (NHWC, HWIO)."""
    ty = torch.tensor(y.transpose(0, 3, 1, 2), dtype=torch.float64)
    full = F.conv_transpose2d(ty, torch.tensor(w.transpose(3, 2, 0, 1), dtype=torch.float64))
    (h_lo, h_hi), (w_lo, w_hi) = padding
    full = full[:, :, h_lo : full.shape[2] - h_hi, w_lo : full.shape[3] - w_hi]
    return full.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("batch, c_in", [(1, 1), (1, 3), (2, 1), (2, 3)])
@pytest.mark.parametrize("padding", [((2, 0), (2, 0)), ((2, 0), (1, 1)), ((1, 2), (2, 0))])
def test_transpose_padding_beyond_the_kernel_span_on_one_side(batch, c_in, padding):
    """A (lo, hi) padding beyond the kernel's span on one side gives the adjoint's dilated
    convolution a negative padding there, which XLA's CPU convolution computed from
    uninitialised memory (errors up to 1e24 beside a positive padding on the other side);
    jaxconv crops the output instead. Forward, input tangent and weight gradient."""
    rng = np.random.default_rng(batch * 10 + c_in)
    y = rng.standard_normal((batch, 4, 5, 2)).astype(np.float32)
    w = rng.standard_normal((2, 2, c_in, 2)).astype(np.float32)
    fn = jax.jit(lambda y, w: conv_transpose(y, w, padding=padding))
    want = _torch_transpose_cropped(y, w, padding)
    np.testing.assert_allclose(fn(y, w), want, rtol=1e-5, atol=1e-5)
    ty, tw = rng.standard_normal(y.shape), rng.standard_normal(w.shape)
    ty, tw = ty.astype(np.float32), tw.astype(np.float32)
    tangent = jax.jvp(fn, (y, w), (ty, tw))[1]
    want_t = _torch_transpose_cropped(ty, w, padding) + _torch_transpose_cropped(y, tw, padding)
    np.testing.assert_allclose(tangent, want_t, rtol=1e-5, atol=1e-4)
    g = rng.standard_normal(want.shape).astype(np.float32)
    gw = jax.vjp(fn, y, w)[1](jnp.asarray(g))[1]  # <gw, tw> = <transpose(y, tw), g>
    want_w = np.vdot(_torch_transpose_cropped(y, tw, padding), g)
    np.testing.assert_allclose(np.vdot(np.asarray(gw, np.float64), tw), want_w, rtol=1e-4)


def test_conv_transpose_check_grads():
    rng = seeded_rng("check_grads_t")
    y = rng.standard_normal((1, 4, 3, 2))
    w = conv_weight(rng, 2, CF, 4, 4, 2, kernel=2)
    b = rng.standard_normal(4)
    kw = dict(stride=2, padding=(1, 0), output_padding=(1, 0), groups=2, data_format=CF)
    fn = lambda y, w, b: conv_transpose(y, w, bias=b, **kw)  # noqa: E731
    check_grads(fn, (y, w, b), order=2, modes=("fwd", "rev"))

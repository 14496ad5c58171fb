"""What the conv and conv_transpose tests share: seeded generators, layout conversions, weights in
either format, PyTorch's conv_transpose with the gradients of a random cotangent, and jaxconv's
forward and vjp under jit compared with PyTorch's in both data formats."""

import zlib

import chex
import jax
import numpy as np
import torch
import torch.nn.functional as F
from conv_oracle import CF, CL

TORCH_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def seeded_rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def to_last(a):
    """(N, C, *spatial) -> (N, *spatial, C)."""
    return np.moveaxis(np.asarray(a), 1, -1)


def to_first(a):
    return np.moveaxis(np.asarray(a), -1, 1)


def hwio(w):
    """PyTorch's (O, I, *kernel) -> (*kernel, I, O)."""
    n = w.ndim - 2
    return np.transpose(np.asarray(w), (*range(2, n + 2), 1, 0))


def oihw(w):
    n = w.ndim - 2
    return np.transpose(np.asarray(w), (n + 1, n, *range(n)))


def torch_conv_t(
    y, w, b, g_seed, *, stride, padding, output_padding, dilation, groups, g_dtype=None
):
    n = w.ndim - 2
    ty, tw = (torch.tensor(a, requires_grad=True) for a in (y, w))
    tb = None if b is None else torch.tensor(b, requires_grad=True)
    out = TORCH_CONV_T[n](
        ty,
        tw,
        tb,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=groups,
        dilation=dilation,
    )
    g = seeded_rng("g", g_seed).standard_normal(out.shape)
    g = g.astype(g_dtype or y.dtype).astype(y.dtype)
    (out * torch.tensor(g)).sum().backward()
    grads = (ty.grad, tw.grad, None if tb is None else tb.grad)
    return out.detach().numpy(), g, [None if t is None else t.numpy() for t in grads]


def jax_vjp(fn, x, w, b, g, **kw):
    """Forward and the gradients of <fn(x, w, b), g> with respect to x, w and b, under jit."""

    def run(x, w, b, g):
        out, pullback = jax.vjp(lambda x, w, b: fn(x, w, bias=b, **kw), x, w, b)
        return out, pullback(g)

    return jax.jit(run)(x, w, b, g)


def assert_close(got, want, rtol=1e-5):
    want = np.asarray(want)
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=rtol * scale)


def compare_both_formats(fn, x, w, b, ref, g, grads, **kw):
    """Run ``fn`` in channels_first (w as OIHW) and channels_last (w as HWIO) against PyTorch."""
    out, (gx, gw, gb) = jax_vjp(fn, x, w, b, g, data_format=CF, **kw)
    chex.assert_shape(out, ref.shape)
    for got, want in zip((out, gx, gw), (ref, *grads[:2]), strict=True):
        assert_close(got, want)
    out, (gx, gw, gb_last) = jax_vjp(fn, to_last(x), hwio(w), b, to_last(g), data_format=CL, **kw)
    assert_close(to_first(out), ref)
    assert_close(to_first(gx), grads[0])
    assert_close(oihw(gw), grads[1])
    if b is not None:
        assert_close(gb, grads[2])
        assert_close(gb_last, grads[2])


def conv_weight(rng, n, data_format, c_in, c_out, groups, kernel=3):
    w = rng.standard_normal((c_out, c_in // groups, *(kernel,) * n))
    return w if data_format == CF else hwio(w)

"""conv against PyTorch CPU: forward and gradients, padding modes, derivatives of higher order;
for conv and conv_transpose alike random configurations, dtypes, batch axes and vmap, the program
(lax's convolution, one per group on the CPU, precision) and argument errors."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conv_oracle import CF, CL
from conv_torch import (
    TORCH_CONV_T,
    assert_close,
    compare_both_formats,
    conv_weight,
    jax_vjp,
    seeded_rng,
    torch_conv_t,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads
from jaxprs import primitives

from jaxconv import conv, conv_transpose

TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _pairs(padding, kernel, dilation):
    """The test's own reading of a padding spec as (lo, hi) pairs (stride-1 "SAME")."""
    n = len(kernel)
    dil = (dilation,) * n if isinstance(dilation, int) else dilation
    spans = [d * (k - 1) for k, d in zip(kernel, dil, strict=True)]
    if padding == "SAME":
        return [(t // 2, t - t // 2) for t in spans]
    if padding == "FULL":
        return [(t, t) for t in spans]
    if padding == "VALID":
        return [(0, 0)] * n
    if isinstance(padding, int):
        return [(padding, padding)] * n
    return [p if isinstance(p, tuple) else (p, p) for p in padding]


def _torch_pad(x, pairs, mode):
    flat = [v for lo_hi in reversed(pairs) for v in lo_hi]
    return F.pad(x, flat, mode="constant" if mode == "zeros" else mode)


def _torch_conv(x, w, b, g_seed, *, stride, padding, dilation, groups, padding_mode, g_dtype=None):
    """PyTorch forward and the gradients of <out, g> for a random cotangent g (channels first)."""
    n = w.ndim - 2
    tx, tw = (torch.tensor(a, requires_grad=True) for a in (x, w))
    tb = None if b is None else torch.tensor(b, requires_grad=True)
    pad = padding
    if padding_mode != "zeros" or padding == "FULL" or not isinstance(padding, (int, str)):
        explicit = _pairs(padding, w.shape[2:], dilation)
        if padding_mode == "zeros" and all(lo == hi for lo, hi in explicit):
            pad, xin = tuple(lo for lo, _ in explicit), tx
        else:
            pad, xin = 0, _torch_pad(tx, explicit, padding_mode)
    else:
        pad, xin = padding.lower() if isinstance(padding, str) else padding, tx
    out = TORCH_CONV[n](xin, tw, tb, stride=stride, padding=pad, dilation=dilation, groups=groups)
    g = seeded_rng("g", g_seed).standard_normal(out.shape)
    g = g.astype(g_dtype or x.dtype).astype(x.dtype)
    (out * torch.tensor(g)).sum().backward()
    grads = (tx.grad, tw.grad, None if tb is None else tb.grad)
    return out.detach().numpy(), g, [None if t is None else t.numpy() for t in grads]


# (spatial sizes, kernel, C_in, C_out, stride, padding, dilation, groups, padding_mode, bias)
CONV_CASES = [
    ((11,), (3,), 2, 3, 1, 0, 1, 1, "zeros", True),
    ((12,), (3,), 2, 4, 2, 2, 2, 1, "zeros", False),
    ((11,), (4,), 4, 6, 1, ((2, 1),), 1, 2, "reflect", True),
    ((10,), (3,), 3, 6, 3, 1, 1, 3, "circular", False),
    ((9,), (4,), 2, 3, 1, "SAME", 2, 1, "zeros", True),
    ((9, 8), (3, 3), 2, 3, 1, 1, 1, 1, "zeros", True),
    ((9, 10), (3, 2), 4, 6, 2, (1, 2), (1, 2), 2, "zeros", False),
    ((8, 9), (3, 3), 3, 2, (2, 1), ((1, 0), (0, 2)), 1, 1, "replicate", True),
    ((7, 8), (3, 4), 4, 4, 1, "SAME", 1, 4, "reflect", False),
    ((9, 9), (2, 3), 2, 3, 1, "VALID", 2, 1, "zeros", True),
    ((6, 7), (3, 2), 2, 2, 2, "FULL", 1, 1, "zeros", False),
    ((7, 6), (3, 3), 2, 3, 1, 2, 1, 1, "circular", True),
    ((9, 8), (3, 3), 4, 2, 3, 1, 1, 2, "reflect", False),
    ((5, 6, 5), (3, 2, 3), 2, 3, 1, 1, 1, 1, "zeros", True),
    ((6, 7, 6), (2, 3, 2), 2, 4, 2, (0, 1, 1), (1, 2, 1), 2, "zeros", False),
    ((5, 5, 6), (3, 3, 3), 2, 2, 1, 1, 1, 1, "replicate", True),
    ((5, 4, 5), (3, 3, 2), 3, 6, 1, "SAME", 1, 3, "circular", False),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{len(c[0])}d-{c[5]}-{c[8]}-g{c[7]}")
def test_conv_matches_torch(case):
    sizes, kernel, cin, cout, stride, padding, dilation, groups, mode, has_bias = case
    rng = seeded_rng("conv", case)
    x = rng.standard_normal((2, cin, *sizes)).astype(np.float32)
    w = rng.standard_normal((cout, cin // groups, *kernel)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32) if has_bias else None
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ref, g, grads = _torch_conv(x, w, b, case, padding_mode=mode, **args)
    compare_both_formats(conv, x, w, b, ref, g, grads, padding_mode=mode, **args)


@st.composite
def _random_conv(draw):
    """A random N-d grouped, strided, dilated, padded convolution PyTorch accepts."""
    n = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(n))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(n))
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    sizes = tuple(
        draw(st.integers(max(1, s - 2 * p), 7)) for s, p in zip(span, padding, strict=True)
    )
    return sizes, kernel, cin, cout, stride, padding, dilation, groups


@settings(max_examples=10)
@given(_random_conv(), st.data())
def test_random_configurations_match_torch(config, data):
    sizes, kernel, cin, cout, stride, padding, dilation, groups = config
    rng = seeded_rng("random", config)
    x = rng.standard_normal((2, cin, *sizes))
    w = rng.standard_normal((cout, cin // groups, *kernel))
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    n = len(sizes)
    want = TORCH_CONV[n](torch.tensor(x), torch.tensor(w), **kw).numpy()
    got = jax.jit(functools.partial(conv, data_format=CF, **kw))(x, w)
    assert_close(got, want, rtol=1e-12)
    # the transposed convolution of that output, with an output_padding PyTorch accepts
    out_pad = tuple(
        data.draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True)
    )
    t_got = jax.jit(functools.partial(conv_transpose, output_padding=out_pad, data_format=CF, **kw))
    try:
        t_want = TORCH_CONV_T[n](torch.tensor(want), torch.tensor(w), output_padding=out_pad, **kw)
    except RuntimeError:  # PyTorch: the output would be empty; jaxconv says so before XLA
        with pytest.raises(ValueError, match=r"^conv_transpose: .*padding"):
            t_got(want, w)
        return
    assert_close(t_got(want, w), t_want.numpy(), rtol=1e-12)


GRAD_CASES = [
    dict(n=2, data_format=CL, stride=2, padding=((1, 0), (0, 2)), dilation=(1, 2), groups=2),
    dict(n=1, data_format=CF, stride=1, padding=2, dilation=2, groups=1, padding_mode="reflect"),
]


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("padding", [((3, 0), (3, 0)), ((0, 4), (2, 3)), ((1, 1), (4, 4))])
def test_padding_beyond_the_kernel_span_has_the_right_gradient(groups, padding):
    """Outputs that read padding only: XLA's CPU convolution gets the gradient's negative
    padding wrong (uninitialised memory), so jaxconv pads such excess explicitly."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 5, 4)).astype(np.float32)
    w = rng.standard_normal((2, 2, 4 // groups, 4)).astype(np.float32)
    g = rng.standard_normal(np.asarray(conv(x, w, padding=padding, groups=groups)).shape)
    fn = jax.jit(lambda x, w: conv(x, w, padding=padding, groups=groups))
    out, vjp = jax.vjp(fn, x, w)
    dx, dw = vjp(jnp.asarray(g, jnp.float32))
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    tw = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)
    flat = [p for pair in reversed(padding) for p in pair]
    t = F.conv2d(F.pad(tx, flat), tw, groups=groups)
    t.backward(torch.tensor(g.transpose(0, 3, 1, 2), dtype=torch.float32))
    np.testing.assert_allclose(out, t.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(dx, tx.grad.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(dw, tw.grad.numpy().transpose(2, 3, 1, 0), atol=1e-4)


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c['n']}d-{c['data_format']}")
def test_conv_check_grads(case):
    case = dict(case)
    n, data_format = case.pop("n"), case["data_format"]
    rng = seeded_rng("check_grads", n, data_format)
    sizes = (5, 4)[:n]
    x = rng.standard_normal((1, 4, *sizes) if data_format == CF else (1, *sizes, 4))
    w = conv_weight(rng, n, data_format, 4, 2, case["groups"], kernel=2)
    b = rng.standard_normal(2)
    check_grads(
        lambda x, w, b: conv(x, w, bias=b, **case), (x, w, b), order=2, modes=("fwd", "rev")
    )


def test_hessian_matches_torch():
    rng = seeded_rng("hessian")
    x = rng.standard_normal((1, 2, 5, 4))
    w = rng.standard_normal((2, 1, 2, 3))

    def loss(w):
        return jnp.sum(jnp.tanh(conv(x, w, stride=2, padding=1, groups=2, data_format=CF)))

    def torch_loss(w):
        return torch.tanh(F.conv2d(torch.tensor(x), w, stride=2, padding=1, groups=2)).sum()

    want = torch.autograd.functional.hessian(torch_loss, torch.tensor(w)).numpy()
    np.testing.assert_allclose(jax.jit(jax.hessian(loss))(w), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [(jnp.float16, 2e-3), (jnp.bfloat16, 2e-2), (jnp.float32, 1e-5), (jnp.float64, 1e-12)],
)
@pytest.mark.parametrize("transpose", [False, True])
def test_dtypes(dtype, rtol, transpose):
    rng = seeded_rng("dtype", transpose)
    # inputs exactly representable in `dtype`; PyTorch float64 on the same values is the reference
    x, w, b = (
        np.asarray(jnp.asarray(rng.uniform(-1, 1, shape), dtype), np.float64)
        for shape in ((2, 4, 6, 5), (4, 2, 3, 3), (4,))
    )
    kw = dict(stride=2, padding=1, groups=2, dilation=1)
    if transpose:
        fn, kw["output_padding"] = conv_transpose, 1
        ref, g, grads = torch_conv_t(x, w, b, "dtype", g_dtype=dtype, **kw)
    else:
        fn = conv
        ref, g, grads = _torch_conv(x, w, b, "dtype", g_dtype=dtype, padding_mode="zeros", **kw)
    args = (jnp.asarray(a, dtype) for a in (x, w, b, g))
    out, got_grads = jax_vjp(fn, *args, data_format=CF, **kw)
    chex.assert_type([out, *got_grads], dtype)
    for got, want in zip((out, *got_grads), (ref, *grads), strict=True):
        assert_close(np.asarray(got, np.float64), want, rtol=rtol)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("data_format", [CF, CL])
def test_batch_axes_and_vmap(transpose, data_format):
    rng = seeded_rng("batch", transpose, data_format)
    # x has 4 channels: the input of a 4 -> 6 conv, or the output side of a 6 -> 4 conv
    w = conv_weight(rng, 2, data_format, 6 if transpose else 4, 4 if transpose else 6, 2)
    fn = conv_transpose if transpose else conv
    kw = dict(stride=2, padding=1, groups=2, data_format=data_format)
    f = jax.jit(lambda x: fn(x, w, **kw))
    x = rng.standard_normal((3, 2, 4, 5, 6) if data_format == CF else (3, 2, 5, 6, 4))
    flat = f(x.reshape((6, *x.shape[2:])))
    many = f(x)
    chex.assert_shape(many, (3, 2, *flat.shape[1:]))
    np.testing.assert_allclose(many.reshape(flat.shape), flat, rtol=1e-12)
    np.testing.assert_allclose(f(x[1, 0]), flat[2], rtol=1e-12)  # no batch axis
    np.testing.assert_allclose(jax.vmap(f)(x), many, rtol=1e-12)
    # vmap over the weight: one convolution per kernel
    ws = jnp.stack([w, 2 * w])
    per_w = jax.jit(jax.vmap(lambda w: fn(x[0], w, **kw)))(ws)
    np.testing.assert_allclose(per_w[1], 2 * per_w[0], rtol=1e-12)
    np.testing.assert_allclose(per_w[0], many[0], rtol=1e-12)


def _lax_direct(x, w, stride, padding, dilation, groups, specs):
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=stride,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=specs,
        feature_group_count=groups,
    )


@pytest.mark.parametrize("data_format", [CF, CL])
def test_same_program_as_lax(data_format):
    """Ungrouped: exactly lax's convolution (grouped ones: test_grouped_convolutions_per_group;
    1x1 kernels: test_pointwise.py)."""
    x = jnp.ones((2, 8, 9, 10) if data_format == CF else (2, 9, 10, 8), jnp.float32)
    w = jnp.ones((4, 8, 3, 2) if data_format == CF else (3, 2, 8, 4), jnp.float32)
    specs = ("NCHW", "OIHW", "NCHW") if data_format == CF else ("NHWC", "HWIO", "NHWC")
    ours = jax.make_jaxpr(
        lambda x, w: conv(
            x, w, stride=(2, 1), padding=[(1, 0), (1, 1)], dilation=(1, 2), data_format=data_format
        )
    )(x, w)
    theirs = jax.make_jaxpr(
        lambda x, w: _lax_direct(x, w, (2, 1), ((1, 0), (1, 1)), (1, 2), 1, specs)
    )(x, w)
    assert str(ours) == str(theirs)
    # extra batch axes add reshapes only; never a transpose
    eqns = jax.make_jaxpr(lambda x: conv(x, w, data_format=data_format))(x[None]).eqns
    assert {e.primitive.name for e in eqns} == {"reshape", "conv_general_dilated"}


@pytest.mark.parametrize("data_format", [CF, CL])
@pytest.mark.parametrize("groups", [2, 4, 64])
def test_grouped_convolutions_per_group(data_format, groups):
    """On the CPU a grouped convolution is one dense convolution per group (XLA's grouped one
    does ``groups`` times the work there); the GPU program keeps XLA's grouped convolution.
    The values are checked against PyTorch in test_conv_matches_torch."""
    cpu = jax.devices("cpu")[0]  # the CPU's program on any host
    c = max(8, groups * 2)
    x = jax.device_put(jnp.ones((2, c, 6, 5) if data_format == CF else (2, 6, 5, c)), cpu)
    shape = (c, c // groups, 3, 3) if data_format == CF else (3, 3, c // groups, c)
    w = jax.device_put(jnp.ones(shape), cpu)
    f = jax.jit(lambda x, w: conv(x, w, padding=1, groups=groups, data_format=data_format))
    text = f.lower(x, w).compile().as_text()
    counts = re.findall(r"feature_group_count=(\d+)", text)
    assert " convolution(" in text and not counts  # only dense convolutions
    lowered = f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert f"feature_group_count = {groups}" in lowered


_X = np.ones((2, 6, 6, 4), np.float32)
_W = np.ones((3, 3, 2, 6), np.float32)
_CONV_ERRORS = [
    (dict(x=_X, w=np.ones((3, 4), np.float32)), ValueError, "`w`"),
    (dict(x=np.ones((4,), np.float32), w=_W), ValueError, "`x`"),
    (dict(x=_X, w=_W, groups=3), ValueError, "channels of `x`"),
    (dict(x=_X, w=_W), ValueError, "per group"),
    (dict(x=_X, w=np.ones((3, 3, 1, 6), np.float32), groups=4), ValueError, "output channels"),
    (dict(x=_X, w=_W, groups=0), ValueError, "`groups`"),
    (dict(x=_X, w=_W, groups=2.0), TypeError, "`groups`"),
    (dict(x=_X, w=_W, groups=2, padding_mode="mirror"), ValueError, "`padding_mode`"),
    (dict(x=_X, w=_W, groups=2, data_format="NHWC"), ValueError, "`data_format`"),
    (dict(x=_X, w=np.ones((7, 3, 2, 6), np.float32), groups=2), ValueError, "window"),
    (dict(x=_X, w=_W, groups=2, bias=np.ones(4, np.float32)), ValueError, "`bias`"),
    (dict(x=_X, w=_W, groups=2, bias=np.ones(6, np.float64)), TypeError, "`bias`"),
    (dict(x=_X, w=_W.astype(np.float64), groups=2), TypeError, "same dtype"),
    (dict(x=_X.astype(np.int32), w=_W, groups=2), TypeError, "`x`"),
    (dict(x=_X, w=_W, groups=2, stride=0), ValueError, "`stride`"),
    (dict(x=_X, w=_W, groups=2, dilation=(1,)), ValueError, "`dilation`"),
    (dict(x=_X, w=_W, groups=2, padding="HALF"), ValueError, "`padding`"),
    (dict(x=_X, w=_W, groups=2, padding=-1), ValueError, "`padding`"),
    (dict(x=_X, w=_W, groups=2, precision="fast"), ValueError, "`precision`"),
    (dict(x=_X, w=_W, groups=2, precision=("highest",)), ValueError, "`precision`"),
    (dict(x=_X, w=_W, groups=2, precision=3), TypeError, "`precision`"),
    (
        dict(x=_X, w=_W, groups=2, padding=6, padding_mode="reflect"),
        ValueError,
        "reflect.*`padding`",
    ),
    (
        dict(x=_X, w=_W, groups=2, padding=7, padding_mode="circular"),
        ValueError,
        "circular.*`padding`",
    ),
    (dict(x=_X, w=np.ones((0, 3, 2, 6), np.float32), groups=2), ValueError, "kernel"),
    (
        dict(x=np.ones((1, 8, 8, 4), np.float32), w=np.ones((3, 3, 3, 4, 6), np.float32)),
        ValueError,
        r"spatial axis 0 .*`w` has 3 spatial axes, so `x` reads as batch \(\), spatial "
        r"\(1, 8, 8\) and 4 channels",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "what"), _CONV_ERRORS)
def test_conv_errors(kwargs, error, what):
    with pytest.raises(error, match=r"^conv: .*" + what.replace("`", r"\`")) as info:
        jax.jit(
            lambda x, w: conv(x, w, **{k: v for k, v in kwargs.items() if k not in ("x", "w")})
        )(kwargs["x"], kwargs["w"])
    assert "conv_general_dilated" not in str(info.value)


_Y = np.ones((2, 3, 3, 6), np.float32)
_CONV_T_ERRORS = [
    (dict(y=_Y, w=np.ones((3, 3, 2, 4), np.float32), groups=2), ValueError, "channels"),
    (dict(y=_Y, w=_W, groups=4), ValueError, "divisible"),
    (dict(y=_Y, w=_W, groups=2, output_padding=1), ValueError, "`output_padding`"),
    (dict(y=_Y, w=_W, groups=2, stride=2, output_padding=2), ValueError, "`output_padding`"),
    (dict(y=_Y, w=_W, groups=2, stride=2, padding="SAME", output_padding=1), ValueError, "SAME"),
    (dict(y=_Y, w=_W, groups=2, padding="HALF"), ValueError, "`padding`"),
    (dict(y=_Y, w=_W, groups=2, padding=3), ValueError, "padding"),
    (dict(y=_Y, w=_W, groups=2, bias=np.ones(6, np.float32)), ValueError, "`bias`"),
    (dict(y=_Y[0, 0], w=_W, groups=2), ValueError, "`y`"),
    (dict(y=_Y, w=_W.astype(np.float16), groups=2), TypeError, "same dtype"),
    (dict(y=_Y, w=_W, groups=2, precision=("highest", None)), ValueError, "`precision`"),
]


@pytest.mark.parametrize(("kwargs", "error", "what"), _CONV_T_ERRORS)
def test_conv_transpose_errors(kwargs, error, what):
    with pytest.raises(error, match=r"^conv_transpose: .*" + what.replace("`", r"\`")):
        rest = {k: v for k, v in kwargs.items() if k not in ("y", "w")}
        jax.jit(lambda y, w: conv_transpose(y, w, **rest))(kwargs["y"], kwargs["w"])


@pytest.mark.parametrize(
    ("precision", "want"),
    [
        (None, None),
        ("highest", "HIGHEST"),
        (lax.Precision.HIGH, "HIGH"),
        (("highest", lax.Precision.DEFAULT), ("HIGHEST", "DEFAULT")),
    ],
)
def test_precision_reaches_the_convolutions(precision, want):
    """``precision`` is the one of every convolution, forward and derivative (on GPUs the
    default multiplies float32 in TensorFloat-32; "highest" is full float32)."""
    x, w = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 4, 5))

    def loss(x, w):
        y = conv(x, w, padding=1, precision=precision)
        return jnp.sum(conv_transpose(y, w, padding=1, precision=precision) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w)
    convs = primitives(jaxpr, "conv_general_dilated")  # also those of platform branches
    assert len(convs) >= 4
    # None is lax's own default (jax_default_matmul_precision, which conftest.py sets).
    raw = jax.make_jaxpr(lambda a, b: lax.conv(a, b, (1, 1), "SAME"))(
        jnp.ones((1, 1, 4, 4)), jnp.ones((1, 1, 3, 3))
    )
    default = raw.jaxpr.eqns[0].params["precision"]
    for eqn in convs:
        got = eqn.params["precision"]
        if want is None:
            assert got == default
        else:
            names = tuple(p.name for p in got)
            assert names in (want, want[::-1]) if isinstance(want, tuple) else names == (want,) * 2

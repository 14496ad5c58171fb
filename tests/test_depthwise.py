"""Depthwise convolution (``groups`` equal to the input channels): the CPU's sum of window taps
against PyTorch, XLA's own convolution and itself under every transformation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conv_oracle import CF, CL, TOLERANCES, check_vjp, formatted, to_format
from jax import lax
from jax.test_util import check_grads

from jaxconv import conv

TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# (spatial sizes, kernel, channels, multiplier, stride, (lo, hi) per axis, dilation, padding_mode)
CASES = [
    ((9, 8), (3, 3), 4, 1, 1, ((1, 1), (1, 1)), 1, "zeros"),
    ((9, 8), (3, 3), 3, 2, 2, ((1, 1), (1, 1)), 1, "zeros"),
    ((10, 9), (3, 2), 2, 1, (2, 1), ((1, 0), (0, 2)), (1, 2), "zeros"),
    ((7, 8), (5, 5), 2, 1, 1, ((2, 2), (2, 2)), 1, "reflect"),
    ((8, 9), (7, 7), 2, 3, 1, ((3, 3), (3, 3)), 1, "zeros"),  # ConvNeXt's kernel
    ((12,), (3,), 5, 1, 3, ((2, 2),), 2, "circular"),
    ((6, 5, 7), (3, 2, 3), 3, 1, 1, ((1, 1), (0, 0), (1, 1)), 1, "replicate"),
    ((1, 1), (2, 2), 3, 1, 1, ((1, 1), (1, 1)), 2, "zeros"),  # windows reading padding only
]


def _torch_reference(x, w, b, g, stride, pairs, dilation, mode):
    """PyTorch float64 on NCHW: the output and the gradients of x, w and b for cotangent g."""
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    flat = [q for lo_hi in reversed(pairs) for q in lo_hi]
    padded = F.pad(tx, flat, mode="constant" if mode == "zeros" else mode)
    conv_nd = TORCH_CONV[x.ndim - 2]
    out = conv_nd(padded, tw, tb, stride=stride, dilation=dilation, groups=x.shape[1])
    out.backward(torch.tensor(g))
    return out.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()


def _inputs(case, seed, dtype=np.float64):
    sizes, kernel, channels, mult = case[:4]
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (2, channels, *sizes))
    w = rng.uniform(-1, 1, (channels * mult, 1, *kernel))
    b = rng.uniform(-1, 1, channels * mult)
    # values exactly representable in `dtype`, so PyTorch float64 sees the same numbers
    return tuple(np.asarray(jnp.asarray(a, dtype), np.float64) for a in (x, w, b)), rng


def _function(case, data_format):
    _, _, channels, _, stride, pairs, dilation, mode = case
    kw = dict(stride=stride, padding=pairs, dilation=dilation, padding_mode=mode)
    return jax.jit(
        lambda x, w, b: conv(x, w, bias=b, groups=channels, data_format=data_format, **kw)
    )


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
@pytest.mark.parametrize("data_format", [CL, CF])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_torch(case, data_format, dtype, tol):
    (x, w, b), rng = _inputs(case, CASES.index(case), dtype)
    f = _function(case, data_format)
    reference = lambda g: _torch_reference(x, w, b, g, *case[4:])  # noqa: E731
    check_vjp(f, (x, w, b), reference, data_format=data_format, dtype=dtype, tol=tol, rng=rng)


@pytest.mark.parametrize("data_format", [CL, CF])
def test_check_grads_float64(data_format):
    """Both modes at second order: the tangent is linear in x and in w."""
    case = CASES[2]
    inputs, _ = _inputs(case, 7)
    f = _function(case, data_format)
    check_grads(f, formatted(inputs, data_format), order=2, modes=("fwd", "rev"))


def test_vmap_over_inputs_and_weights():
    (x, w, b), _ = _inputs(CASES[1], 3)
    f = _function(CASES[1], CL)
    x, w = to_format(x, CL), to_format(w, CL, True)
    xs, ws = jnp.stack([x, 2 * x]), jnp.stack([w, -w])
    np.testing.assert_allclose(jax.vmap(f, (0, None, None))(xs, w, b)[1], f(2 * x, w, b))
    np.testing.assert_allclose(jax.vmap(f, (None, 0, None))(x, ws, b)[1], f(x, -w, b))


def _ops(text):
    return set(re.findall(r"= \S+ (convolution|fusion)\(", text))


@pytest.mark.parametrize(
    ("channels", "groups", "kernel", "taps"),
    [(8, 8, (3, 3), True), (8, 8, (7, 7), True), (8, 8, (8, 7), False), (8, 4, (3, 3), False)],
)
def test_which_convolutions_take_the_taps(channels, groups, kernel, taps):
    """On the CPU depthwise kernels of up to 49 taps are a sum of slices (no convolution left in
    the program); larger kernels and other groupings are convolutions (one per group), and the
    program lowered for a GPU keeps XLA's grouped convolution."""
    cpu = jax.devices("cpu")[0]  # the CPU's program on any host
    x = jax.device_put(jnp.ones((2, 10, 10, channels)), cpu)
    w = jax.device_put(jnp.ones((*kernel, channels // groups, channels)), cpu)
    f = jax.jit(lambda x, w: conv(x, w, padding=1, groups=groups))
    assert ("convolution" in _ops(f.lower(x, w).compile().as_text())) != taps
    lowered = f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.convolution" in lowered


def test_same_values_as_xla():
    """The taps against XLA's own grouped convolution, in float32."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 13, 12, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 1, 12)), jnp.float32)
    got = conv(x, w, stride=2, padding=((1, 1), (0, 1)), groups=6)
    want = lax.conv_general_dilated(
        x,
        w,
        (2, 2),
        ((1, 1), (0, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=6,
        precision="highest",
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

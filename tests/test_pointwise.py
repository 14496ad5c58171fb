"""1x1 convolutions: the CPU's matrix product against PyTorch, XLA's own convolution and itself
under every transformation."""

import functools
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
from jaxprs import primitives

from jaxconv import conv

TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# (spatial sizes, C_in, C_out, stride, padding, padding_mode)
CASES = [
    ((9, 8), 4, 6, 1, 0, "zeros"),
    ((9, 8), 3, 5, 2, 0, "zeros"),
    ((10, 7), 2, 3, (3, 1), "VALID", "zeros"),
    ((7, 6), 3, 2, 1, 1, "reflect"),  # padded first, then the product
    ((12,), 5, 4, 3, 0, "zeros"),
    ((5, 6, 4), 3, 4, (1, 2, 2), "SAME", "zeros"),
    ((1, 1), 4, 4, 1, 0, "zeros"),
]


def _inputs(case, seed, dtype=np.float64):
    sizes, c_in, c_out = case[:3]
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (2, c_in, *sizes))
    w = rng.uniform(-1, 1, (c_out, c_in, *(1,) * len(sizes)))
    b = rng.uniform(-1, 1, c_out)
    # values exactly representable in `dtype`, so PyTorch float64 sees the same numbers
    return tuple(np.asarray(jnp.asarray(a, dtype), np.float64) for a in (x, w, b)), rng


def _function(case, data_format):
    _, _, _, stride, padding, mode = case
    kw = dict(stride=stride, padding=padding, padding_mode=mode, data_format=data_format)
    return jax.jit(lambda x, w, b: conv(x, w, bias=b, **kw))


def _torch_reference(x, w, b, g, case):
    """PyTorch float64 on NCHW: the output and the gradients of x, w and b for cotangent g."""
    _, _, _, stride, padding, mode = case
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    if mode != "zeros":
        tx_in = F.pad(tx, [padding] * 2 * (x.ndim - 2), mode=mode)
        padding = 0
    else:
        tx_in = tx
    padding = padding.lower() if isinstance(padding, str) else padding
    if padding == "same":  # PyTorch refuses "same" with strides; for a 1x1 kernel it is 0
        padding = 0
    out = TORCH_CONV[x.ndim - 2](tx_in, tw, tb, stride=stride, padding=padding)
    out.backward(torch.tensor(g))
    return out.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
@pytest.mark.parametrize("data_format", [CL, CF])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_torch(case, data_format, dtype, tol):
    (x, w, b), rng = _inputs(case, CASES.index(case), dtype)
    f = _function(case, data_format)
    reference = lambda g: _torch_reference(x, w, b, g, case)  # noqa: E731
    check_vjp(f, (x, w, b), reference, data_format=data_format, dtype=dtype, tol=tol, rng=rng)


def test_bfloat16_is_summed_in_float32():
    """64 products of bfloat16 numbers, summed in float32 and rounded once: within half a
    bfloat16 step of the exact sum (plus float32's rounding of the sum)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.uniform(-1, 1, (3, 5, 5, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.uniform(-1, 1, (1, 1, 64, 8)), jnp.bfloat16)
    got = np.float64(jax.jit(conv)(x, w))
    exact = np.einsum("nhwc,co->nhwo", np.float64(x), np.float64(w[0, 0]))
    magnitude = np.einsum("nhwc,co->nhwo", np.abs(np.float64(x)), np.abs(np.float64(w[0, 0])))
    bound = np.abs(exact) * 2.0**-8 + magnitude * 64 * 2.0**-24
    assert np.all(np.abs(got - exact) <= bound)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("data_format", [CL, CF])
def test_16bit_weight_gradient_is_rounded_once(data_format, dtype):
    """The weight's derivative sums batch and positions in float32 and rounds once: within
    half a unit in the last place of the exact gradient of the rounded inputs (channels first
    once summed per-batch products rounded to 16 bits, errors up to 9e-3 in bfloat16)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.uniform(0, 1, (64, 16, 8, 8)), dtype)
    w = jnp.asarray(rng.uniform(0, 0.1, (4, 16, 1, 1)), dtype)
    g = jnp.asarray(rng.uniform(0, 1, (64, 4, 8, 8)), dtype)
    wide = [np.asarray(a.astype(jnp.float64)) for a in (x, g)]
    exact = np.einsum("bchw,bohw->oc", *wide)[..., None, None]
    if data_format == CL:
        x, w, g = jnp.moveaxis(x, 1, -1), jnp.transpose(w, (2, 3, 1, 0)), jnp.moveaxis(g, 1, -1)
    pullback = jax.vjp(lambda w: conv(x, w, data_format=data_format), w)[1]
    gw = np.asarray(pullback(g)[0].astype(jnp.float64))
    if data_format == CL:
        gw = np.transpose(gw, (3, 2, 0, 1))
    half_ulp = 2.0 ** -(jnp.finfo(dtype).nmant + 1)
    assert np.max(np.abs(gw - exact) / exact) <= half_ulp * (1 + 1e-3)


@pytest.mark.parametrize("data_format", [CL, CF])
def test_check_grads_float64(data_format):
    """Both modes at second order."""
    case = CASES[1]
    inputs, _ = _inputs(case, 7)
    f = _function(case, data_format)
    check_grads(f, formatted(inputs, data_format), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("data_format", [CL, CF])
def test_vmap_and_batch_axes(data_format):
    (x, w, b), _ = _inputs(CASES[0], 3)
    f = _function(CASES[0], data_format)
    x, w = to_format(x, data_format), to_format(w, data_format, True)
    xs, ws = jnp.stack([x, 2 * x]), jnp.stack([w, -w])
    np.testing.assert_allclose(jax.vmap(f, (0, None, None))(xs, w, b)[1], f(2 * x, w, b))
    np.testing.assert_allclose(jax.vmap(f, (None, 0, None))(x, ws, b)[1], f(x, -w, b))
    np.testing.assert_allclose(f(xs, w, b)[1], f(2 * x, w, b), rtol=1e-12)  # two batch axes
    np.testing.assert_allclose(f(x[0], w, b), f(x, w, b)[0], rtol=1e-12)  # no batch axis


@pytest.mark.parametrize("data_format", [CL, CF])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_same_values_as_xla(data_format, dtype):
    rng = np.random.default_rng(1)
    last = data_format == CL
    x = jnp.asarray(rng.standard_normal((4, 13, 12, 16) if last else (4, 16, 13, 12)), dtype)
    w = jnp.asarray(rng.standard_normal((1, 1, 16, 24) if last else (24, 16, 1, 1)), dtype)
    specs = ("NHWC", "HWIO", "NHWC") if last else ("NCHW", "OIHW", "NCHW")
    got = conv(x, w, stride=(2, 3), data_format=data_format)
    wide = (x.astype(jnp.float32), w.astype(jnp.float32))
    want = lax.conv_general_dilated(*wide, (2, 3), "VALID", dimension_numbers=specs)
    np.testing.assert_allclose(np.float32(got), want.astype(dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("data_format", [CL, CF])
def test_cpu_program_is_a_matrix_product(data_format):
    """On the CPU a 1x1 convolution is a dot, forward and backward (padding is applied to ``x``
    first); the program lowered for a GPU keeps XLA's convolution."""
    cpu = jax.devices("cpu")[0]  # the CPU's program on any host
    last = data_format == CL
    x = jax.device_put(jnp.ones((2, 6, 5, 8) if last else (2, 8, 6, 5)), cpu)
    w = jax.device_put(jnp.ones((1, 1, 8, 4) if last else (4, 8, 1, 1)), cpu)

    def loss(x, w, padding=0):
        return jnp.sum(conv(x, w, stride=2, padding=padding, data_format=data_format) ** 2)

    padded = functools.partial(loss, padding=1)
    for f in (loss, jax.grad(loss, argnums=(0, 1)), padded, jax.grad(padded, argnums=(0, 1))):
        text = jax.jit(f).lower(x, w).compile().as_text()
        assert " convolution(" not in text and re.search(r" dot\(", text)
        lowered = jax.jit(f).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
        assert "stablehlo.convolution" in lowered


def test_precision_reaches_the_product():
    x, w = jnp.ones((2, 6, 6, 4)), jnp.ones((1, 1, 4, 5))
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: conv(x, w, precision="highest").sum()))(x, w)
    dots = primitives(jaxpr, "dot_general")
    assert dots
    assert all(p.name == "HIGHEST" for e in dots for p in e.params["precision"])

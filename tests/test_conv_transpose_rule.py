"""conv_transpose's derivative in ``w`` on the CPU: ``conv``'s own derivative in ``w`` (for input
``g`` and cotangent ``y``), not XLA's transpose of the input-dilated convolution, whose window
reversal XLA's CPU backend runs as a slow loop. Values are checked against PyTorch in
test_conv_transpose.py; here the program's form and agreement with XLA's own rule."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxconv import conv, conv_transpose

CASES = [
    dict(stride=2, padding=1, output_padding=1),
    dict(stride=(2, 3), padding=((1, 0), (2, 1)), output_padding=(0, 2), groups=2),
    dict(stride=1, padding=0, output_padding=1, dilation=2),  # outputs past y's end
    dict(stride=2, padding="SAME", data_format="channels_first"),
]


def _xla_rule(y, w, kw):
    """The same transposed convolution by JAX's transpose of ``conv`` (XLA's rule)."""
    shape = jax.eval_shape(lambda y: conv_transpose(y, w, **kw), y).shape
    kw = {k: v for k, v in kw.items() if k != "output_padding"}

    def forward(x):  # the convolution's outputs that y stands for (its first ones)
        return lax.slice(conv(x, w, **kw), (0,) * y.ndim, y.shape)

    return jax.linear_transpose(forward, jnp.zeros(shape, y.dtype))(y)[0]


@pytest.mark.parametrize("kw", CASES, ids=str)
def test_weight_derivatives_match_xla(kw):
    rng = np.random.default_rng(0)
    last = kw.get("data_format", "channels_last") == "channels_last"
    y = jnp.asarray(rng.standard_normal((2, 5, 6, 4) if last else (2, 4, 5, 6)))
    shape = (3, 3, 4 // kw.get("groups", 1), 4) if last else (4, 4 // kw.get("groups", 1), 3, 3)
    w, tw = (jnp.asarray(rng.standard_normal(shape)) for _ in range(2))
    ours = lambda w: conv_transpose(y, w, **kw)  # noqa: E731
    theirs = lambda w: _xla_rule(y, w, kw)  # noqa: E731
    g = jnp.asarray(rng.standard_normal(ours(w).shape))
    np.testing.assert_allclose(ours(w), theirs(w), rtol=1e-12, atol=1e-12)
    got, want = jax.vjp(ours, w)[1](g)[0], jax.vjp(theirs, w)[1](g)[0]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    got, want = jax.jvp(ours, (w,), (tw,))[1], jax.jvp(theirs, (w,), (tw,))[1]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_cpu_weight_gradient_has_no_window_reversal():
    cpu = jax.devices("cpu")[0]  # the CPU's program on any host
    rng = np.random.default_rng(0)  # arguments, not constants XLA could fold away
    y = jax.device_put(rng.standard_normal((2, 6, 6, 4), np.float32), cpu)
    w = jax.device_put(rng.standard_normal((3, 3, 4, 4), np.float32), cpu)

    def convolutions(f):
        text = jax.jit(jax.grad(f, argnums=1)).lower(y, w).compile().as_text()
        lines = [line for line in text.splitlines() if " convolution(" in line]
        return [re.search(r"window=\{[^}]*\}", line).group(0) for line in lines]

    ours = convolutions(lambda y, w: (conv_transpose(y, w, stride=2, padding=1) ** 2).sum())
    assert ours and not any("rhs_reversal" in w for w in ours)
    # XLA's own rule for the same transposed convolution reverses the window
    theirs = convolutions(lambda y, w: (lax.conv_transpose(y, w, (2, 2), "SAME") ** 2).sum())
    assert any("rhs_reversal" in w for w in theirs)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_cpu_grouped_transpose_is_dense_per_group(data_format):
    """Grouped transposed convolutions run one dense convolution per group on the CPU, forward
    and backward (see jaxconv._src.grouped); values: test_weight_derivatives_match_xla."""
    cpu = jax.devices("cpu")[0]
    last = data_format == "channels_last"
    y = jax.device_put(jnp.ones((2, 5, 6, 8) if last else (2, 8, 5, 6)), cpu)
    w = jax.device_put(jnp.ones((3, 3, 2, 8) if last else (8, 2, 3, 3)), cpu)

    def loss(y, w):
        out = conv_transpose(y, w, stride=2, padding=1, groups=4, data_format=data_format)
        return (out**2).sum()

    for f in (loss, jax.grad(loss, argnums=(0, 1))):
        text = jax.jit(f).lower(y, w).compile().as_text()
        assert " convolution(" in text and "feature_group_count" not in text

"""16-bit convolutions with a bias: the sum of products and bias is rounded once, as PyTorch's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconv import conv, conv_transpose

# name, function of (x, w, b), x shape (channels last), w shape, bias length
CASES = [
    ("3x3", lambda x, w, b: conv(x, w, padding=1, bias=b), (3, 3, 16, 8), 8),
    ("1x1", lambda x, w, b: conv(x, w, bias=b), (1, 1, 16, 8), 8),
    ("grouped", lambda x, w, b: conv(x, w, padding=1, groups=4, bias=b), (3, 3, 4, 8), 8),
    ("depthwise", lambda x, w, b: conv(x, w, padding=1, groups=16, bias=b), (3, 3, 1, 32), 32),
    (
        "3x3 channels first",
        lambda x, w, b: conv(
            jnp.moveaxis(x, -1, 1),
            jnp.moveaxis(w, (2, 3), (1, 0)),
            padding=1,
            bias=b,
            data_format="channels_first",
        ),
        (3, 3, 16, 8),
        8,
    ),
    (
        "transpose",
        lambda x, w, b: conv_transpose(x, w, stride=2, padding=1, bias=b),
        (3, 3, 8, 16),
        8,
    ),
    (
        "transpose grouped",
        lambda x, w, b: conv_transpose(x, w, stride=2, padding=1, groups=2, bias=b),
        (3, 3, 4, 16),
        8,
    ),
]


def _half_ulp(exact, dtype):
    """Half a unit in the last place of ``dtype`` at each (nonzero) value of ``exact``."""
    bits = jnp.finfo(dtype).nmant
    return 2.0 ** (np.floor(np.log2(np.abs(exact))) - bits - 1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize(("name", "fn", "w_shape", "b_len"), CASES, ids=[c[0] for c in CASES])
def test_16bit_output_with_bias_is_rounded_once(name, fn, w_shape, b_len, dtype):
    """Every output is within half a unit (plus float32's accumulation error) of the float64
    result on the same 16-bit inputs, as PyTorch's; rounding the convolution to 16 bits before
    adding the bias put 18-29% of bfloat16 outputs a whole unit off. Gradients keep the input
    dtype."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 16)), dtype)
    w = jnp.asarray(rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[:-1])), dtype)
    b = jnp.asarray(rng.standard_normal(b_len), dtype)
    wide = [a.astype(jnp.float64) for a in (x, w, b)]
    exact = np.asarray(jax.jit(fn)(*wide))
    got = jax.jit(fn)(x, w, b)
    assert got.dtype == dtype
    err = np.abs(np.asarray(got, np.float64) - exact)
    nonzero = exact != 0
    # float32 accumulation may move a value that cancels to near zero by about 1e-7 first
    assert np.all(err[nonzero] <= 1.05 * _half_ulp(exact[nonzero], dtype) + 1e-6)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2))(x, w, b)
    assert [g.dtype for g in grads] == [dtype] * 3

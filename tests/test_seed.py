"""The seed homework's convolution answers (section 1.1), computed by the library."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconv import conv, conv_output_size, conv_transpose

# The seed's Table 1 and its published answers (1.1 c and d).
A = [
    [4, 5, 2, 2, 1],
    [3, 3, 2, 2, 4],
    [4, 3, 4, 1, 1],
    [5, 1, 4, 1, 2],
    [5, 1, 3, 1, 4],
]
B = [
    [4, 3, 3],
    [5, 5, 5],
    [2, 4, 3],
]
C_PUBLISHED = [
    [109, 92, 72],
    [108, 85, 74],
    [110, 74, 79],
]
DEDA_PUBLISHED = [
    [4, 7, 10, 6, 3],
    [9, 17, 25, 16, 8],
    [11, 23, 34, 23, 11],
    [7, 16, 24, 17, 8],
    [2, 6, 9, 7, 3],
]

DTYPES = [jnp.float32, jnp.float64]


def _image(values, dtype):
    """A single-channel image without a batch axis: (H, W, 1)."""
    return jnp.asarray(values, dtype)[..., None]


def _kernel(values, dtype):
    """A 1-in, 1-out kernel in HWIO: (K, K, 1, 1)."""
    return jnp.asarray(values, dtype)[..., None, None]


def test_output_size_formula():
    # O = floor((I + 2P - K)/S) + 1 with I=5, K=3, P=0, S=1
    assert conv_output_size(5, 3, stride=1, padding=0) == 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_c(dtype):
    c = jax.jit(conv)(_image(A, dtype), _kernel(B, dtype))
    chex.assert_shape(c, (3, 3, 1))
    chex.assert_type(c, dtype)
    np.testing.assert_array_equal(np.asarray(c[..., 0]), np.asarray(C_PUBLISHED, np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_c_channels_first(dtype):
    a = jnp.asarray(A, dtype)[None, None]  # (N, C, H, W)
    b = jnp.asarray(B, dtype)[None, None]  # (O, I, H, W)
    c = jax.jit(lambda a, b: conv(a, b, data_format="channels_first"))(a, b)
    np.testing.assert_array_equal(np.asarray(c[0, 0]), np.asarray(C_PUBLISHED, np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_a_by_grad(dtype):
    # dE/dC = ones(3, 3) is the gradient of E = sum(C)
    b = _kernel(B, dtype)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(conv(a, b))))(_image(A, dtype))
    chex.assert_shape(grad, (5, 5, 1))
    np.testing.assert_array_equal(np.asarray(grad[..., 0]), np.asarray(DEDA_PUBLISHED, np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_a_by_conv_transpose(dtype):
    ones = jnp.ones((3, 3, 1), dtype)
    grad = jax.jit(conv_transpose)(ones, _kernel(B, dtype))
    chex.assert_shape(grad, (5, 5, 1))
    np.testing.assert_array_equal(np.asarray(grad[..., 0]), np.asarray(DEDA_PUBLISHED, np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_a_by_full_convolution_with_rotated_kernel(dtype):
    ones = jnp.ones((3, 3, 1), dtype)
    rotated = _kernel(np.rot90(np.asarray(B), 2), dtype)
    grad = jax.jit(lambda g, k: conv(g, k, padding="FULL"))(ones, rotated)
    chex.assert_shape(grad, (5, 5, 1))
    np.testing.assert_array_equal(np.asarray(grad[..., 0]), np.asarray(DEDA_PUBLISHED, np.float64))


def test_seed_first_entry_by_hand():
    # the seed's worked sum for C[0, 0]: the top-left 3x3 patch of A times B, summed
    patch = np.asarray(A)[:3, :3] * np.asarray(B)
    assert patch.sum() == C_PUBLISHED[0][0]
    c = conv(_image(A, jnp.float64), _kernel(B, jnp.float64))
    assert float(c[0, 0, 0]) == float(patch.sum())

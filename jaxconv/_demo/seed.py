"""The seed homework's worked example, computed by the library.

Section 1.1 of the seed: a 5x5 image A, a 3x3 kernel B, the output size formula, the forward pass
C and the gradient dE/dA for dE/dC = ones(3, 3). Everything printed as "jaxconv" is computed by
the library; the seed's published values are printed beside it only for comparison.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxconv import conv, conv_output_size, conv_transpose

# The seed's Table 1 (inputs) and its published answers.
SEED_A = np.array(
    [[4, 5, 2, 2, 1], [3, 3, 2, 2, 4], [4, 3, 4, 1, 1], [5, 1, 4, 1, 2], [5, 1, 3, 1, 4]],
    np.float32,
)
SEED_B = np.array([[4, 3, 3], [5, 5, 5], [2, 4, 3]], np.float32)
SEED_OUTPUT_SIZE = 3
SEED_C = np.array([[109, 92, 72], [108, 85, 74], [110, 74, 79]], np.float32)
SEED_DEDA = np.array(
    [
        [4, 7, 10, 6, 3],
        [9, 17, 25, 16, 8],
        [11, 23, 34, 23, 11],
        [7, 16, 24, 17, 8],
        [2, 6, 9, 7, 3],
    ],
    np.float32,
)


def _rows(matrix) -> list[str]:
    m = np.asarray(matrix, np.float64)
    cells = [[f"{v:g}" for v in row] for row in m]
    width = max(len(c) for row in cells for c in row)
    return ["[ " + " ".join(c.rjust(width) for c in row) + " ]" for row in cells]


def _mark(ok: bool) -> str:
    return "match" if ok else "MISMATCH"


def _matrix(title: str, matrix) -> None:
    print(f"{title}:")
    for row in _rows(matrix):
        print(f"    {row}")


def _compare(title: str, computed, published) -> bool:
    """Print the computed matrix beside the published one; True when they are equal."""
    left, right = _rows(computed), _rows(published)
    ok = np.shape(computed) == np.shape(published) and np.allclose(computed, published, atol=1e-4)
    width = max(len(r) for r in left)
    print(f"{title}  [{_mark(ok)}]")
    print(f"    {'jaxconv'.ljust(width)}    seed (published)")
    for a, b in zip(left, right, strict=True):
        print(f"    {a.ljust(width)}    {b}")
    return ok


def _gradients(a, b):
    """dE/dA for dE/dC = ones three ways: jax.grad, conv_transpose, full conv with rot180(B)."""
    ones = jnp.ones((3, 3, 1), a.dtype)
    by_grad = jax.jit(jax.grad(lambda x: jnp.sum(conv(x, b))))(a)
    by_transpose = jax.jit(conv_transpose)(ones, b)
    rotated = b[::-1, ::-1]
    by_full = jax.jit(lambda g, k: conv(g, k, padding="FULL"))(ones, rotated)
    return by_grad[..., 0], by_transpose[..., 0], by_full[..., 0]


def conv_walkthrough() -> bool:
    """Print the seed's section 1.1 answered by jaxconv; True when every value matches."""
    print("=" * 72)
    print("Seed 1.1: convolution of a 5x5 image A with a 3x3 kernel B (no padding, stride 1)")
    print("(deep-learning 'convolution' is cross-correlation, as in PyTorch and lax)")
    print("=" * 72)
    _matrix("A (image, 5x5)", SEED_A)
    _matrix("B (kernel, 3x3)", SEED_B)
    size = conv_output_size(5, 3, stride=1, padding=0)
    print(
        "\n(a, b) output size O = floor((I + 2P - K)/S) + 1 = floor((5 + 0 - 3)/1) + 1 = "
        f"{size}   seed: {SEED_OUTPUT_SIZE}  [{_mark(size == SEED_OUTPUT_SIZE)}]"
    )
    oks = [size == SEED_OUTPUT_SIZE]
    a = jnp.asarray(SEED_A)[..., None]  # (H, W, C=1), no batch axis
    b = jnp.asarray(SEED_B)[..., None, None]  # (H, W, I=1, O=1)
    c = jax.jit(conv)(a, b)[..., 0]
    print()
    oks.append(_compare("(c) C = conv(A, B)", c, SEED_C))
    by_grad, by_transpose, by_full = _gradients(a, b)
    print("\n(d) dE/dA for dE/dC = ones(3, 3)")
    oks.append(_compare("  by jax.grad(lambda A: sum(conv(A, B)))", by_grad, SEED_DEDA))
    oks.append(_compare("  by conv_transpose(ones(3, 3), B)", by_transpose, SEED_DEDA))
    oks.append(_compare("  by conv(ones(3, 3), rot180(B), padding='FULL')", by_full, SEED_DEDA))
    print(f"\nSeed 1.1: {sum(oks)}/{len(oks)} answers match the published values.\n")
    return all(oks)

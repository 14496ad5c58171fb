"""Gradient programs lowered for CUDA (on any machine, no GPU needed): reproducible by design.

A float scatter-add whose indices may collide sums in a varying order on GPUs, and XLA's
``select_and_scatter`` uses atomics there. jaxconv's gradients must not contain either: max, avg
and Lp pooling transpose slices and selects into pads and adds, and the gathers of adaptive
windows and of fractional ones with an integer ``alpha`` transpose into scatters of unique
indices. (Fractional windows with a non-integer ``alpha`` scatter each window's taps at once,
colliding where windows overlap; ``fractional_max_pool`` documents that exception.)
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv

X = jnp.ones((2, 12, 12, 3), jnp.float32)
SAMPLES = np.full((2, 3, 2), 0.4, np.float32)

OPS = {
    "max_pool 3x3 s2 p1": lambda x: jaxconv.max_pool(x, (3, 3), 2, 1),
    "max_pool 2x2 indices": lambda x: jaxconv.max_pool(x, (2, 2), 2, return_indices=True)[0],
    "max_pool 3-D": lambda x: jaxconv.max_pool(x[..., None], (2, 3, 2), (1, 2, 1)),
    "avg_pool 3x3 s1 p1": lambda x: jaxconv.avg_pool(x, (3, 3), 1, 1),
    "avg_pool 5x6": lambda x: jaxconv.avg_pool(x, (5, 6), 1, (1, 2)),
    "lp_pool p=2": lambda x: jaxconv.lp_pool(x, 2.0, (3, 3), 2),
    "lp_pool p=8": lambda x: jaxconv.lp_pool(x, 8.0, (3, 3), 2),
    "lp_pool p=inf": lambda x: jaxconv.lp_pool(x, math.inf, (3, 3), 2),
    "adaptive_max_pool 12->5": lambda x: jaxconv.adaptive_max_pool(x, (5, 5)),
    "adaptive_avg_pool 12->5": lambda x: jaxconv.adaptive_avg_pool(x, (5, 5)),
    "adaptive_max_pool 12->7x1": lambda x: jaxconv.adaptive_max_pool(x, (7, 1)),
    "fractional 2x2 r0.5": lambda x: jaxconv.fractional_max_pool(
        x, (2, 2), output_ratio=0.5, samples=SAMPLES
    ),
    "fractional 2x2 graham r0.5": lambda x: jaxconv.fractional_max_pool(
        x, (2, 2), output_ratio=0.5, key=jax.random.key(0)
    ),
}


@pytest.mark.parametrize("name", list(OPS))
def test_cuda_gradient_has_no_colliding_scatter(name):
    grad = jax.jit(jax.grad(lambda x: jnp.sum(OPS[name](x) ** 2)))
    text = jax.export.export(grad, platforms=["cuda"])(X).mlir_module()
    assert "select_and_scatter" not in text
    scatters = re.findall(r'"stablehlo\.scatter".*', text)
    for scatter in scatters:
        assert "unique_indices = true" in scatter, scatter[:300]

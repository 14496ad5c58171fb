"""Gradient programs lowered for CUDA (on any machine, no GPU needed): reproducible by design.

A float scatter-add whose indices may collide sums in a varying order on GPUs, and XLA's
``select_and_scatter`` uses atomics there. jaxconv's gradients must not contain either: max, avg
and Lp pooling transpose slices and selects into pads and adds, and the gathers of adaptive
and fractional windows transpose into scatters of unique indices. Fractional windows with a
non-integer ``alpha`` gather tap by tap, a scatter of unique indices each, and keep one stacked
gather per axis (colliding scatters) for the case where the samples' rounding repeats a start
before the last window, checked at run time (see ``test_fractional.py``).
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
    "fractional 3x3 alpha 2.25 and 1.8": lambda x: jaxconv.fractional_max_pool(
        x, (3, 3), output_size=(5, 6), samples=SAMPLES
    ),
    "fractional graham overlapping": lambda x: jaxconv.fractional_max_pool_graham(
        x, output_size=(5, 7), key=jax.random.key(0), overlapping=True
    ),
    "fractional graham disjoint": lambda x: jaxconv.fractional_max_pool_graham(
        x, output_ratio=(0.6, 0.6), key=jax.random.key(1), pseudo_random=True
    ),
}


# The fractional ops whose CUDA program keeps the run-time fallback: one colliding scatter per
# spatial axis, beside the unique-index scatters of the tap-by-tap gathers. (PyTorch's
# sequences pick from a band of static slices: their transpose gathers, no scatter at all.)
FALLBACKS = {
    "fractional graham overlapping": 2,
    "fractional graham disjoint": 2,
}


def cuda_scatters(f, *args):
    text = jax.export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()
    assert "select_and_scatter" not in text
    scatters = re.findall(r'"stablehlo\.scatter".*', text)
    unique = [s for s in scatters if "unique_indices = true" in s]
    return unique, [s for s in scatters if "unique_indices = true" not in s]


@pytest.mark.parametrize("name", list(OPS))
def test_cuda_gradient_has_no_colliding_scatter(name):
    unique, colliding = cuda_scatters(jax.grad(lambda x: jnp.sum(OPS[name](x) ** 2)), X)
    assert len(colliding) <= FALLBACKS.get(name, 0), colliding[0][:300]
    assert unique or name not in FALLBACKS


@pytest.mark.parametrize("graham", [False, True])
def test_cuda_tap_by_tap_fractional_tangent_scatters_unique_indices(graham):
    """The branch GPUs run unless a start repeats: its transpose has unique scatters only."""
    from jaxconv._src import select
    from jaxconv._src.fractional import _spread_starts, torch_starts
    from jaxconv._src.fractional_plan import FractionalPlan
    from jaxconv._src.graham import graham_bounds, graham_windows

    if graham:
        (bounds,) = graham_bounds(jax.random.key(0), (12,), (5,), False)
        aux = graham_windows(bounds, 12, True)
        plan = FractionalPlan(1, 12, 4, 5)
    else:
        start = torch_starts(jnp.asarray(SAMPLES[..., 0]), 12, 5, 3)
        aux, plan = (_spread_starts(start, 0, 2, True), None), FractionalPlan(1, 12, 3, 5)
    offset = jnp.zeros((2, 5, 12, 3), jnp.int8)

    def pick(t):
        return select._pick_taps(plan.distinct_taps(t, aux), offset)

    unique, colliding = cuda_scatters(
        jax.linear_transpose(pick, X), jnp.ones((2, 5, 12, 3), jnp.float32)
    )
    assert unique and not colliding, colliding[:1]


def test_cuda_half_precision_starts_round_explicitly():
    """16-bit window starts round every operation with ``reduce_precision``, which XLA's GPU
    compiler keeps (it may drop a float32 -> bfloat16 -> float32 round trip)."""
    x = X.astype(jnp.bfloat16)
    samples = jnp.asarray(SAMPLES, jnp.bfloat16)

    def pool(x):
        return jaxconv.fractional_max_pool(x, (3, 3), output_size=(5, 6), samples=samples)

    text = jax.export.export(jax.jit(pool), platforms=["cuda"])(x).mlir_module()
    assert text.count("stablehlo.reduce_precision") >= 4


def test_cuda_16bit_tiling_average_keeps_one_reduction():
    """On the CPU a 16-bit tiling average sums its taps in groups of strided slices (fast
    there); GPUs keep one reduction of the widened input, which compiles in a fraction of the
    time."""
    x = jnp.ones((2, 64, 64, 3), jnp.bfloat16)

    def pool(x):
        return jaxconv.adaptive_avg_pool(x, (2, 2))

    def slices(platform):
        text = jax.export.export(jax.jit(pool), platforms=[platform])(x).mlir_module()
        return text.count("stablehlo.slice ")

    assert slices("cpu") > 32
    assert slices("cuda") <= 2

"""Gradient programs lowered for CUDA (on any machine, no GPU needed): reproducible by design.

A float scatter-add whose indices may collide sums in a varying order on GPUs, and XLA's
``select_and_scatter`` uses atomics there. jaxconv's gradients must not contain either: max, avg
and Lp pooling transpose slices and selects into pads and adds, adaptive averages' adjoints
gather, and the gathers of adaptive max and fractional windows transpose into scatters of
unique indices, or, for adaptive windows of
varying lengths gathered at once, into scatters where at most two nonzero terms meet at each
element (two numbers and zeros sum alike in any order; ``test_adaptive_programs.py`` checks
the bound). Fractional windows with a
non-integer ``alpha`` gather tap by tap, a scatter of unique indices each, and keep one stacked
gather per axis (colliding scatters) for the case where the samples' rounding repeats a start
before the last window, checked at run time (see ``test_fractional.py``).

Where GPUs take a form of their own (``lax.platform_dependent``), that form is also run here on
the CPU against the CPU's.
"""

import functools
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
    "max_pool 4x4 s2 p1 (per axis)": lambda x: jaxconv.max_pool(x, (4, 4), 2, 1),
    "avg_pool 3x3 s1 p1": lambda x: jaxconv.avg_pool(x, (3, 3), 1, 1),
    "avg_pool 5x6": lambda x: jaxconv.avg_pool(x, (5, 6), 1, (1, 2)),
    "lp_pool p=2": lambda x: jaxconv.lp_pool(x, 2.0, (3, 3), 2),
    "lp_pool p=8": lambda x: jaxconv.lp_pool(x, 8.0, (3, 3), 2),
    "lp_pool p=inf": lambda x: jaxconv.lp_pool(x, math.inf, (3, 3), 2),
    "adaptive_max_pool 12->5": lambda x: jaxconv.adaptive_max_pool(x, (5, 5)),
    "adaptive_avg_pool 12->5": lambda x: jaxconv.adaptive_avg_pool(x, (5, 5)),
    "adaptive_avg_pool 96->5 (20 taps)": lambda x: jaxconv.adaptive_avg_pool(
        jnp.tile(x, (1, 8, 1, 1)), (5, 5)
    ),
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


# Adaptive max pooling over windows of varying lengths: one gather of all taps per such axis,
# whose scatter collides, with at most two nonzero terms per element.
TWO_TERMS = {
    "adaptive_max_pool 12->5": 2,
    "adaptive_max_pool 12->7x1": 1,
}


# Averages: their adjoints are window sums and gathers, no scatter at all.
NO_SCATTER = {
    "avg_pool 3x3 s1 p1",
    "avg_pool 5x6",
    "adaptive_avg_pool 12->5",
    "adaptive_avg_pool 96->5 (20 taps)",
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
    allowed = FALLBACKS.get(name, 0) + TWO_TERMS.get(name, 0)
    assert len(colliding) <= allowed, colliding[0][:300]
    assert unique or name not in FALLBACKS
    assert not (unique or colliding) or name not in NO_SCATTER


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
        return select.pick_taps(plan.distinct_taps(t, aux), offset)

    unique, colliding = cuda_scatters(
        jax.linear_transpose(pick, X), jnp.ones((2, 5, 12, 3), jnp.float32)
    )
    assert unique and not colliding, colliding[:1]


@pytest.mark.parametrize("graham", [False, True], ids=["torch", "graham"])
def test_cuda_grad_of_vmap_over_keys_lowers_with_conditionals(graham):
    """``grad`` of a ``vmap`` over per-member keys: the GPU's tap-by-tap tangent and the band
    keep their ``lax.cond`` (one predicate for the batch), so the program lowers for CUDA."""
    keys = jax.random.split(jax.random.key(0), 2)

    def loss(x, k):
        if graham:
            return jnp.sum(
                jaxconv.fractional_max_pool_graham(x[None], output_ratio=(0.7, 0.7), key=k)
            )
        return jnp.sum(jaxconv.fractional_max_pool(x[None], (3, 3), output_size=(5, 6), key=k))

    grad = jax.grad(lambda x: jnp.sum(jax.vmap(loss)(x, keys)))
    text = jax.export.export(jax.jit(grad), platforms=["cuda"])(X).mlir_module()
    assert "stablehlo.case" in text or "stablehlo.if" in text
    assert "select_and_scatter" not in text


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


def _tied(shape, dtype, seed, nan=0.05):
    """Few distinct values (ties), signed zeros, infinities and a fraction ``nan`` of NaNs."""
    rng = np.random.default_rng(seed)
    values = np.array([-np.inf, -1.0, -0.0, 0.0, 0.5, 1.0, np.inf], np.float32)
    x = rng.choice(values, shape)
    x[rng.random(shape) < nan] = np.nan
    return jnp.asarray(x, dtype)


@pytest.mark.parametrize("taps", [2, 4, 9])
def test_gpu_joint_winners_equal_the_cpu_fold(taps):
    """GPUs find the joint max winners as the first tap equal to a max (one fusion there); the
    CPU folds a running winner. Both give PyTorch's tie rule: checked here on the CPU."""
    from jaxconv._src import joint

    parts = [_tied((64, 5), jnp.float32, seed) for seed in range(taps)]
    kw = {"taps": list(range(taps)), "dtype": jnp.int8}
    gpu, cpu = joint._first_equal(*parts, **kw), joint._running_winner(*parts, **kw)
    nan = jnp.any(jnp.stack([jnp.isnan(p) for p in parts]), axis=0)
    np.testing.assert_array_equal(np.where(nan, -1, gpu), np.where(nan, -1, cpu))
    stacked = np.stack([np.asarray(p) for p in parts])
    expected = np.argmax(stacked == np.max(stacked, axis=0), axis=0)
    np.testing.assert_array_equal(np.where(nan, -1, cpu), np.where(nan, -1, expected))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_16bit_tiling_mean_equals_the_cpu_sums(dtype):
    """The reduction GPUs keep for 16-bit tiling windows and the CPU's grouped per-axis sums
    give the same means (both sum in float32 and round once)."""
    from jaxconv._src import avg
    from jaxconv._src.boxmap import tile_sum
    from jaxconv._src.window import window_spec

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 96, 3)) * 100, dtype)
    spec = window_spec("avg_pool", x.shape, (32, 48))
    total = functools.partial(tile_sum, plans=spec.plans, matmul=False)
    finish = functools.partial(avg.narrow, dtype=dtype, fuse=False)
    gpu = avg._tiled_mean(x, total=total, div=32.0 * 48, spec=spec, finish=finish)
    cpu = avg.window_mean(x, spec, 32.0 * 48, finish)
    assert gpu.dtype == cpu.dtype == dtype
    np.testing.assert_array_equal(np.asarray(gpu, np.float32), np.asarray(cpu, np.float32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("k", [4, 32, 70])
def test_gpu_16bit_stacked_winners_equal_the_cpu_keys(dtype, k):
    """GPUs, which keep subnormals, reduce 16-bit stacked taps as they are; the CPU reduces
    their order keys. Both give PyTorch's winner (the first maximum, or the last NaN) and its
    value: checked here on the CPU (the GPU test run covers subnormals)."""
    from jaxconv._src import stacked

    x = _tied((k, 40, 3), dtype, k)
    gpu = stacked.stacked_winner(x, 0, k, keyed=False)
    cpu = stacked.stacked_winner(x, 0, k, keyed=True)
    stacked = np.asarray(x, np.float32)
    nan = np.isnan(stacked)
    last_nan = k - 1 - np.argmax(nan[::-1], axis=0)
    first_max = np.argmax(stacked == np.nanmax(np.where(nan, -np.inf, stacked), axis=0), axis=0)
    expected = np.where(nan.any(axis=0), last_nan, first_max)
    for value, offset in (gpu, cpu):
        np.testing.assert_array_equal(offset, expected)
        np.testing.assert_array_equal(
            np.asarray(value, np.float32), np.take_along_axis(stacked, expected[None], 0)[0]
        )


_PLANS = {
    "max 3x3 s2 p1": lambda shape: _window_plans(shape, (3, 3), 2, 1),
    "max 2x2 s2": lambda shape: _window_plans(shape, (2, 2), 2, 0),
    "max 5x5 s1 p2": lambda shape: _window_plans(shape, (5, 5), 1, 2),
    "adaptive 12->5": lambda shape: _adaptive_plans(shape, (5, 5)),
    "adaptive 12->2": lambda shape: _adaptive_plans(shape, (2, 2)),
    "adaptive 12->1": lambda shape: _adaptive_plans(shape, (1, 1)),
}


def _window_plans(shape, window, stride, padding, dilation=1):
    from jaxconv._src.window import window_spec

    return window_spec("max_pool", shape, window, stride, padding, dilation=dilation).plans


def _adaptive_plans(shape, output_size):
    from jaxconv._src.adaptive import _as_regular, adaptive_plans

    plans = adaptive_plans("adaptive_max_pool", shape, output_size, "channels_last")
    return tuple(_as_regular(p) for p in plans)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", _PLANS)
def test_gpu_16bit_max_values_equal_the_cpu_keys(name, dtype):
    """Without winners GPUs reduce 16-bit ``x`` as it is, the CPU its order keys: the same
    maxima (NaN where a window holds one), checked here on the CPU on values without
    subnormals (the GPU test run covers those)."""
    from jaxconv._src.argmax import _keyed_max
    from jaxconv._src.select import max_values

    x = _tied((3, 12, 12, 4), dtype, 7, nan=0.005)
    plans = _PLANS[name](x.shape)
    aux = (None,) * len(plans)
    gpu, cpu = max_values(x, aux, plans), _keyed_max(x, aux, plans)
    assert gpu.dtype == cpu.dtype == dtype
    np.testing.assert_array_equal(np.asarray(gpu, np.float32), np.asarray(cpu, np.float32))


@pytest.mark.parametrize(
    ("shape", "output_size"), [((3, 12, 12, 4), (5, 5)), ((2, 11, 32, 8, 3), (4, 3, 3))]
)
def test_gpu_per_axis_picks_equal_the_cpu_flat_pick(shape, output_size):
    """GPUs pick the tangent at adaptive max winners one axis at a time; the CPU gathers all
    axes at once at the flat positions. Same tangents and cotangents (integer cotangents, so
    the sums are exact in any order), checked here on the CPU."""
    from jaxconv._src import flat_pick, select

    x = _tied(shape, jnp.float32, 3, nan=0.01)
    plans = _adaptive_plans(shape, output_size)
    assert flat_pick.flat_pickable(plans)
    aux = (None,) * len(plans)
    _, stages, _ = select.max_stages(x, aux, plans)
    t = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)

    def gpu(t):
        return select.pick(t, aux, plans, stages)

    def cpu(t):
        return flat_pick.flat_pick(t, *stages, plans=plans)

    np.testing.assert_array_equal(gpu(t), cpu(t))
    g = jnp.asarray(np.random.default_rng(1).integers(-9, 9, gpu(t).shape), jnp.float32)
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    (want,), (got,) = jax.linear_transpose(gpu, spec)(g), jax.linear_transpose(cpu, spec)(g)
    np.testing.assert_array_equal(got, want)


def test_block_pick_only_where_its_codes_fit_int32():
    """The block adjoint codes each window's winner in int32; windows so large that the codes
    would not fit keep the per-axis transposes."""
    from jaxconv._src import block_pick

    assert block_pick.block_pickable(_window_plans((1, 99, 99, 99, 1), (9, 9, 9), 8, 4, 2))
    huge = _window_plans((1, 4000, 4000, 4000, 1), (1500,) * 3, 1000, 0, 2)
    assert not block_pick.block_pickable(huge)


@pytest.mark.parametrize(
    ("shape", "window", "stride", "padding", "dilation"),
    [
        ((3, 12, 13, 4), (4, 4), 2, 1, 1),
        ((2, 9, 8, 10, 3), (3, 3, 3), (2, 1, 2), 1, 1),
        ((2, 15, 13, 3), (4, 3), (3, 2), (2, 1), (2, 3)),
    ],
)
def test_gpu_per_axis_picks_equal_the_cpu_block_pick(shape, window, stride, padding, dilation):
    """Regular windows of more than 9 taps: GPUs transpose the per-axis picks, the CPU runs
    the block adjoint. Same tangents and cotangents (integer cotangents, so the sums are exact
    in any order), checked here on the CPU."""
    from jaxconv._src import block_pick, select

    x = _tied(shape, jnp.float32, 5, nan=0.01)
    plans = _window_plans(shape, window, stride, padding, dilation)
    assert block_pick.block_pickable(plans)
    aux = (None,) * len(plans)
    _, stages, _ = select.max_stages(x, aux, plans)
    t = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)

    def gpu(t):
        return select.pick(t, aux, plans, stages)

    def cpu(t):
        return block_pick.block_pick(t, *stages, plans=plans)

    np.testing.assert_array_equal(gpu(t), cpu(t))
    g = jnp.asarray(np.random.default_rng(1).integers(-9, 9, gpu(t).shape), jnp.float32)
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    (want,), (got,) = jax.linear_transpose(gpu, spec)(g), jax.linear_transpose(cpu, spec)(g)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("shape", "axis", "alpha", "kernel"),
    [((3, 12, 5), 1, 2, 2), ((2, 4, 12, 3), 2, 2, 2), ((2, 12, 3), 1, 1, 3)],
)
def test_gpu_band_pick_equals_the_cpu_block_pick(shape, axis, alpha, kernel):
    """PyTorch's fractional starts with an integer ``alpha`` pick from a band of ``2*alpha + k``
    inputs: GPUs transpose the phase pick, the CPU runs the block adjoint. Same tangents and
    cotangents (integer cotangents), checked here on the CPU."""
    from jaxconv._src import block_pick
    from jaxconv._src.window import AxisPlan
    from jaxconv._src.window_argmax import phase_pick

    out = (12 - kernel) // alpha + 1
    band = AxisPlan(axis, 12, 2 * alpha + kernel, alpha, 1, alpha, 0, out)
    out_shape = (*shape[:axis], out, *shape[axis + 1 :])
    rel = np.random.default_rng(2).integers(0, band.kernel, out_shape)
    rel = jnp.asarray(rel, jnp.int16)
    t = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)

    def gpu(t):
        return phase_pick(t, band, rel, shift_offsets=True)

    def cpu(t):
        return block_pick.block_pick(t, rel, plans=(band,))

    assert block_pick.block_pickable((band,))
    np.testing.assert_array_equal(gpu(t), cpu(t))
    g = jnp.asarray(np.random.default_rng(1).integers(-9, 9, out_shape), jnp.float32)
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    (want,), (got,) = jax.linear_transpose(gpu, spec)(g), jax.linear_transpose(cpu, spec)(g)
    np.testing.assert_array_equal(got, want)

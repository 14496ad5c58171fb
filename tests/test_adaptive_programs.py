"""The programs of adaptive_avg_pool and adaptive_max_pool: sizes that do not grow with the output
or the window, gathered windows that overlap at most twice, and on the CPU gradients that gather
(no scatter, no constant folding) and add overlapping cotangents in PyTorch's order, and global
averages summed as a product with ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxconv


def test_gathered_windows_meet_at_most_twice():
    """The scatter that transposes a gathered window of all taps sums, at each input element,
    at most two nonzero terms, so its result does not depend on their order (GPUs): every
    element lies in at most two windows, within a window each element is one in-window tap,
    and the taps past a window's end repeat its last element (a max picks one tap per window;
    an average masks the repeats)."""
    from jaxconv._src.adaptive import AdaptivePlan, _as_regular

    rng = np.random.default_rng(7)
    pairs = [(s, o) for s in range(2, 80) for o in range(1, s)]
    pairs += [(int(s), int(rng.integers(1, s))) for s in rng.integers(80, 5000, 40)]
    gathered = 0
    for size, out in pairs:
        plan = _as_regular(AdaptivePlan(0, size, out))
        if not hasattr(plan, "window"):
            continue
        gathered += 1
        index, inside = plan.index, plan.mask(1)  # (out, kernel) input positions
        np.testing.assert_array_equal(index[:, 0], plan.starts)
        np.testing.assert_array_equal(index.max(axis=1), plan.starts + plan.lengths - 1)
        rows = np.zeros(size, int)
        for row, ok in zip(index, inside, strict=True):
            assert len(set(row[ok])) == ok.sum()  # in-window taps are distinct
            np.testing.assert_array_equal(row[~ok], row[ok][-1])  # repeats of the last one
            rows[np.unique(row)] += 1
        assert rows.max() <= 2, (size, out)
    assert gathered > 2000
    plan = _as_regular(AdaptivePlan(1, 100, 7))
    x = np.arange(2 * 100 * 3).reshape(2, 100, 3)
    np.testing.assert_array_equal(plan.window(x), x[:, plan.index])


def _count_eqns(jaxpr) -> int:
    """Equations of a jaxpr, sub-jaxprs (jit, custom_jvp) included."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _count_eqns(inner)
    return total


def _program_size(fn, shape):
    """Equations of the jaxpr of the gradient and of the lowered program's operations."""
    x = jnp.zeros(shape, jnp.float32)
    grad = jax.grad(lambda v: jnp.sum(fn(v) ** 2))
    hlo = jax.jit(grad).lower(x).as_text()
    ops = sum(1 for line in hlo.splitlines() if " = " in line)
    return _count_eqns(jax.make_jaxpr(grad)(x).jaxpr), ops


@pytest.mark.parametrize("op", ["avg", "max"])
@pytest.mark.parametrize(("size", "small", "large"), [(224, 7, 56), (100, 30, 70)])
def test_program_size_does_not_grow_with_output(op, size, small, large):
    pool = jaxconv.adaptive_avg_pool if op == "avg" else jaxconv.adaptive_max_pool
    few = _program_size(lambda v: pool(v, (small, small)), (1, size, size, 1))
    many = _program_size(lambda v: pool(v, (large, large)), (1, size, size, 1))
    assert many[0] < 2 * few[0], (few, many)
    assert many[1] < 2 * few[1], (few, many)


@pytest.mark.parametrize("op", ["avg", "max"])
def test_program_size_does_not_grow_with_window(op):
    """Windows of varying lengths: 300 -> 7 (44 taps) and 5000 -> 7 (716 taps) give programs of
    the same size (the gradient of 1000 -> 7 ran out of memory compiling one scatter per tap)."""
    pool = jaxconv.adaptive_avg_pool if op == "avg" else jaxconv.adaptive_max_pool
    short = _program_size(lambda v: pool(v, (7, 3)), (1, 300, 10, 1))
    long = _program_size(lambda v: pool(v, (7, 3)), (1, 5000, 10, 1))
    assert long[0] <= short[0] * 1.25, (short, long)
    assert long[1] <= short[1] * 1.25, (short, long)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_program_does_not_grow_with_window(dtype):
    """The max alone over tiling windows of 100 and 10000 taps (and gathered windows of 68
    and 6667) has programs of the same size: a fold of 10000 taps compiled for minutes."""

    def size(shape, out):
        x = jax.ShapeDtypeStruct(shape, dtype)
        pool = jaxconv.adaptive_max_pool
        return _count_eqns(jax.make_jaxpr(lambda v: pool(v, out))(x).jaxpr)

    assert size((1, 20000, 2), (2,)) <= size((1, 200, 2), (2,)) * 1.25
    assert size((1, 20000, 2), (3,)) <= size((1, 203, 2), (3,)) * 1.25


@pytest.mark.parametrize(
    "shape, output_size",
    [((2, 60, 3), (7,)), ((2, 13, 11, 3), (5, 4)), ((2, 10, 40, 8, 2), (4, 6, 5))],
)
def test_cpu_max_gradient_over_varying_windows_gathers(shape, output_size):
    """On the CPU the tangent gathers at the winners' flat positions and its adjoint gathers
    the cotangents of the windows holding each element (no scatter); under vmap and jit it
    equals PyTorch's gradient, integer cotangents summing exactly in any order."""
    rng = np.random.default_rng(5)
    cpu = jax.devices("cpu")[0]  # the CPU's program on any host
    x = jax.device_put(rng.integers(-3, 4, (2, *shape)).astype(np.float32), cpu)  # ties
    g = jax.device_put(
        rng.integers(-9, 9, (2, *shape[:1], *output_size, shape[-1])).astype(np.float32), cpu
    )

    def grad(v, c):
        return jax.vjp(lambda u: jaxconv.adaptive_max_pool(u, output_size), v)[1](c)[0]

    text = jax.jit(grad).lower(x[0], g[0]).compile().as_text()
    assert "scatter" not in text
    got = jax.jit(jax.vmap(grad))(x, g)
    for xi, gi, want in zip(x, g, got, strict=True):
        tx = torch.tensor(np.moveaxis(np.asarray(xi), -1, 1), requires_grad=True)
        pool = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)
        y = pool[len(output_size) - 1](tx, output_size)
        y.backward(torch.tensor(np.moveaxis(np.asarray(gi), -1, 1)))
        np.testing.assert_array_equal(np.moveaxis(tx.grad.numpy(), 1, -1), want)


@pytest.mark.parametrize(
    "shape, output_size",
    [((2, 20, 3), (7,)), ((2, 20, 20, 3), (7, 7)), ((1, 10, 9, 10, 2), (7,) * 3)],
)
def test_gradient_of_a_sum_is_not_constant_folded(shape, output_size):
    """``jax.grad`` of a sum hands the adjoint a constant cotangent: XLA must not evaluate its
    gathers at compile time (float32 (32, 100, 100, 64) -> 7x7 compiled in 26 s against 1 s
    that way), so the program keeps every gather that a cotangent argument needs. Checked on
    the CPU's program, on any host."""
    x = np.random.default_rng(0).standard_normal(shape, np.float32)
    x = jax.device_put(x, jax.devices("cpu")[0])

    def pool(v):
        return jaxconv.adaptive_max_pool(v, output_size)

    def loss(v):
        return jnp.sum(pool(v))

    ones = jnp.ones_like(jax.eval_shape(pool, x), device=x.device)
    summed = jax.jit(jax.grad(loss)).lower(x).compile()
    given = jax.jit(lambda v, c: jax.vjp(pool, v)[1](c)[0]).lower(x, ones).compile()
    assert summed.as_text().count(" gather(") == given.as_text().count(" gather(") > 0
    np.testing.assert_array_equal(summed(x), given(x, ones))


def test_cotangents_of_overlapping_windows_add_in_window_order():
    """One element winning four overlapping windows sums their cotangents in PyTorch's order
    (row-major over the windows): 1 + 1e8 + 1 - 1e8 is 0 in float32 that way."""
    x = np.zeros((1, 5, 5, 1), np.float32)
    x[0, 1, 1, 0] = 1
    g = np.zeros((1, 3, 3, 1), np.float32)
    g[0, :2, :2, 0] = [[1, 1e8], [1, -1e8]]
    with jax.default_device(jax.devices("cpu")[0]):  # the CPU's adjoint on any host
        f = jax.jit(jax.vjp(lambda v: jaxconv.adaptive_max_pool(v, (3, 3)), jnp.asarray(x))[1])
        got = f(jnp.asarray(g))[0]
    tx = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
    F.adaptive_max_pool2d(tx, (3, 3)).backward(torch.tensor(np.moveaxis(g, -1, 1)))
    np.testing.assert_array_equal(got, np.moveaxis(tx.grad.numpy(), 1, -1))
    assert got[0, 1, 1, 0] == 0


@pytest.mark.parametrize(
    ("data_format", "shape", "output_size", "product"),
    [
        ("channels_last", (2, 7, 7, 64), (1, 1), True),
        ("channels_last", (2, 5, 6, 7, 3), (1, 1, None), True),
        ("channels_last", (2, 5, 6, 7, 3), (1, None, 1), False),  # axes not contiguous
        ("channels_first", (2, 64, 7, 7), (1, 1), False),  # nothing after the axes
    ],
)
def test_global_average_on_the_cpu_is_a_product_with_ones(data_format, shape, output_size, product):
    """Whole contiguous axes with channels after them are summed by a batched dot on the CPU
    (faster than XLA's reduction over middle axes); the values are checked in
    test_matches_torch."""
    x = jax.device_put(jnp.zeros(shape), jax.devices("cpu")[0])  # the CPU's program on any host
    f = jax.jit(lambda x: jaxconv.adaptive_avg_pool(x, output_size, data_format=data_format))
    hlo = f.lower(x).compile().as_text()
    assert (" dot(" in hlo) == product
    hlo16 = f.lower(x.astype(jnp.bfloat16)).compile().as_text()
    assert " dot(" not in hlo16  # a float32 copy of 16-bit input is slower to multiply


@pytest.mark.parametrize(
    ("shape", "output_size"), [((2, 100, 8), (7,)), ((2, 100, 90, 8), (7, 7))], ids=str
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_folded_taps_are_not_written_out(shape, output_size, dtype):
    """Windows of 13 to 24 taps find their winners by folding the taps, which are gathers: on
    the CPU the forward with indices and the gradient of a loss of the pooled values keep the
    taps inside the loops that read them, not written out one array per tap (which took
    temporaries larger than the input, and 4-5x the time at 100 -> 7). bfloat16 with indices
    still writes the bits of its input out once (XLA's CPU compiler does not fuse them into the
    fold's 16 gathers), so only its gradient is checked."""
    x = jax.device_put(jnp.zeros(shape, dtype), jax.devices("cpu")[0])

    def with_indices(v):
        return jaxconv.adaptive_max_pool(v, output_size, return_indices=True)

    def squares(v):
        return jnp.sum(jaxconv.adaptive_max_pool(v, output_size).astype(jnp.float32) ** 2)

    for fn in (with_indices, jax.grad(squares)) if dtype == jnp.float32 else (jax.grad(squares),):
        temp = jax.jit(fn).lower(x).compile().memory_analysis().temp_size_in_bytes
        assert temp < x.nbytes / 2, (fn, temp, x.nbytes)

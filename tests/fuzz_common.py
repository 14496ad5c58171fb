"""What the differential fuzz tests of conv and of pooling share: strategies for the parts of a
draw, and the runs of both sides.

jaxconv's side traces a draw once (``jax.eval_shape``: errors are raised at trace time) and runs
it once under ``jax.jit``, computing the outputs and the vector-Jacobian product together; shapes
change on every draw, so nothing is cached between draws. PyTorch's side runs on leaves in its
``(N, C, *spatial)`` layout, and its results come back in jaxconv's layout for the comparison.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fuzz_support import (
    Common,
    DisagreementError,
    close,
    cotangent,
    from_torch_layout,
    to_torch_layout,
)
from hypothesis import strategies as st

import jaxconv

# Each draw compiles a new program: LLVM's expensive passes cost more than the tiny run saves.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jaxconv_op(name):
    fn = getattr(jaxconv, name, None)
    if fn is None:
        pytest.skip(f"jaxconv.{name} is not available")
    return fn


# --- Strategies ---------------------------------------------------------------------------------


@st.composite
def commons(draw, max_channels=3):
    return Common(
        n=draw(st.integers(1, 3)),
        batch=draw(st.sampled_from([(), (2,), (1, 2)])),
        channels=draw(st.integers(1, max_channels)),
        data_format=draw(st.sampled_from(["channels_last", "channels_first"])),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def axes_of(n, lo, hi):
    """An int or a per-axis tuple, each in ``[lo, hi]``."""
    return st.one_of(st.integers(lo, hi), st.tuples(*[st.integers(lo, hi)] * n))


def paddings(n, hi, strings=("VALID", "SAME")):
    """Every accepted padding form: int, per-axis ints, (lo, hi) pairs, strings; 0 half the time
    (large paddings are mostly rejected, and a few rejections are enough)."""
    value = st.one_of(st.just(0), st.integers(0, hi))
    pair = st.tuples(value, value)
    return st.one_of(
        value,
        st.tuples(*[value] * n),
        st.tuples(*[pair] * n),
        st.sampled_from(strings),
    )


def per_axis(value, n):
    return value if isinstance(value, tuple) else (value,) * n


def sizes_for(draw, n, lo=1):
    return tuple(draw(st.integers(lo, 7 if n < 3 else 5)) for _ in range(n))


def array(c: Common, spatial, channels=None, rng=None, positive=False):
    """A random ``x`` in ``c``'s layout and dtype."""
    rng = rng or np.random.default_rng(c.seed)
    ch = c.channels if channels is None else channels
    shape = (*spatial, ch) if c.data_format == "channels_last" else (ch, *spatial)
    x = rng.standard_normal((*c.batch, *shape))
    if positive:
        x = np.abs(x) + 0.05
    return x.astype(c.dtype)


# --- Running both sides -------------------------------------------------------------------------


def run_jax(fname, fn, diff, const=()):
    """``(outputs, grads of the first output w.r.t. diff)`` from one jitted call, or the error.

    Only ValueError/TypeError count as a rejection, and their message must start with the
    function's name; anything else propagates and is a disagreement.
    """

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    try:
        shape = first(jax.eval_shape(fn, *diff, *const))
    except (ValueError, TypeError) as err:
        if not re.match(rf"{fname}: ", str(err)):
            raise DisagreementError(f"error message does not name {fname}: {err}") from err
        return err, None
    cot = jnp.asarray(cotangent(shape.shape, shape.dtype))

    @jax.jit(compiler_options=FAST_COMPILE)
    def both(diff, const, cot):
        out = fn(*diff, *const)
        _, pull = jax.vjp(lambda *a: first(fn(*a, *const)), *diff)
        return out, pull(cot)

    out, grads = both(tuple(jnp.asarray(a) for a in diff), const, cot)
    return out, (np.asarray(cot), [np.asarray(g) for g in grads])


def torch_try(fn, *args):
    try:
        return fn(*args), None
    except RuntimeError as err:
        return None, err


def leaf(a):
    return torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(True)


def torch_grads(out, cot, leaves):
    if not out.requires_grad:  # every window of a reference read padding only: no gradient
        return [np.zeros(t.shape, t.detach().numpy().dtype) for t in leaves]
    out.backward(torch.from_numpy(np.array(cot)))
    return [t.grad.numpy() if t.grad is not None else np.zeros(t.shape) for t in leaves]


def settle(jax_out, torch_err, fname):
    """Outcome when at least one side failed; raises a DisagreementError when only one did."""
    jax_failed = isinstance(jax_out, Exception)
    if jax_failed and torch_err is not None:
        return "reject"
    if jax_failed:
        raise DisagreementError(f"jaxconv rejects what the oracle accepts: {jax_out}")
    raise DisagreementError(f"jaxconv accepts what the oracle rejects: {torch_err}")


def compare(c, names, got, want, bounds=None):
    bounds = bounds or [None] * len(got)
    for name, g, w, b in zip(names[: len(got)], got, want, bounds[: len(got)], strict=True):
        if w is not None:
            close(name, g, w, c.dtype, b)


def torch_out(y, c):
    """A torch output ``(N, C, *spatial)`` back in jaxconv's layout, as numpy."""
    y = y.detach().numpy() if isinstance(y, torch.Tensor) else y
    return from_torch_layout(y, c.batch, c.n, c.data_format)


def torch_in(x, c):
    return leaf(to_torch_layout(x, c.n, c.data_format))


def grad_back(g, c):
    """A gradient w.r.t. ``torch_in(x)`` back in ``x``'s layout."""
    return from_torch_layout(g, c.batch, c.n, c.data_format)

"""Differential fuzzing against PyTorch CPU, and float64 loop references where jaxconv accepts more.

One test per op draws random configurations with hypothesis (derandomized): dims 1-3, shapes,
windows, strides, every padding form, dilations, ceil_mode, divisor rules, data formats, batch
shapes, float32/float64. See ``fuzz_support`` for the outcome classes and the draw count
(``JAXCONV_FUZZ_EXAMPLES``; ``make fuzz`` runs 10,000 per op and prints a summary).

Each draw is traced once (``jax.eval_shape``: errors are raised at trace time) and run once under
``jax.jit`` computing the outputs and the vector-Jacobian product together; shapes change on every
draw, so nothing is cached between draws.
"""

import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fuzz_support import (
    Common,
    DisagreementError,
    close,
    cotangent,
    fractional_starts,
    from_torch_layout,
    pool_out_size,
    reduce_windows,
    ref_lp,
    ref_max,
    resolve_pads,
    run_fuzz,
    to_torch_layout,
    window_counts,
    windows,
)
from hypothesis import assume
from hypothesis import strategies as st

import jaxconv

torch.set_num_threads(1)

# Each draw compiles a new program: LLVM's expensive passes cost more than the tiny run saves.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _op(name):
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


# --- conv / conv_transpose ----------------------------------------------------------------------


@st.composite
def conv_cases(draw, transpose=False):
    c = draw(commons(max_channels=2))
    groups = draw(st.sampled_from([1, 1, 2]))
    strings = ("VALID", "SAME", "FULL")
    return {
        "c": c,
        "sizes": sizes_for(draw, c.n),
        "kernel": tuple(draw(st.integers(1, 3)) for _ in range(c.n)),
        "stride": draw(axes_of(c.n, 1, 3)),
        "dilation": draw(axes_of(c.n, 1, 2)),
        "padding": draw(paddings(c.n, 2 if transpose else 3, strings)),
        "groups": groups,
        "cin": groups * c.channels,
        "cout": groups * draw(st.integers(1, 2)),
        "mode": "zeros"
        if transpose
        else draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"])),
        "output_padding": draw(axes_of(c.n, 0, 2)) if transpose else 0,
        "bias": draw(st.booleans()),
    }


def conv_weight(case, rng):
    """``w`` in jaxconv's layout for the case and the same tensor in PyTorch's OIHW."""
    c, n = case["c"], case["c"].n
    oihw = rng.standard_normal((case["cout"], case["cin"] // case["groups"], *case["kernel"]))
    oihw = oihw.astype(c.dtype)
    w = oihw if c.data_format == "channels_first" else np.transpose(oihw, (*range(2, n + 2), 1, 0))
    return w, oihw


def torch_conv(case, xt, wt, bt):
    c = case["c"]
    s, d = per_axis(case["stride"], c.n), per_axis(case["dilation"], c.n)
    pads = resolve_pads(case["padding"], c.n, xt.shape[2:], case["kernel"], s, d)
    flat = [p for lo_hi in reversed(pads) for p in lo_hi]
    mode = "constant" if case["mode"] == "zeros" else case["mode"]
    xp = F.pad(xt, flat, mode=mode)
    conv = (F.conv1d, F.conv2d, F.conv3d)[c.n - 1]
    return conv(xp, wt, bt, s, 0, d, case["groups"])


def conv_bounds(case, x, oihw, b, cot):
    """Per entry of the output and of each gradient, the sum of the absolute values of its
    terms: the same convolution and gradients on ``|x|``, ``|w|``, ``|b|`` and ``|cot|``."""
    c = case["c"]
    leaves = [leaf(np.abs(to_torch_layout(x, c.n, c.data_format)).astype(np.float64))]
    leaves += [leaf(np.abs(oihw).astype(np.float64))]
    leaves += [leaf(np.abs(b).astype(np.float64))] if b is not None else []
    y = torch_conv(case, *leaves[:2], leaves[2] if b is not None else None)
    abs_cot = np.abs(to_torch_layout(cot, c.n, c.data_format)).astype(np.float64)
    grads = torch_grads(y, abs_cot, leaves)
    grads[0] = grad_back(grads[0], c)
    if c.data_format == "channels_last":
        grads[1] = np.transpose(grads[1], (*range(2, c.n + 2), 1, 0))
    return [torch_out(y, c), *grads]


def check_conv(case):
    c = case["c"]
    rng = np.random.default_rng(c.seed)
    x = array(c, case["sizes"], case["cin"], rng)
    w, oihw = conv_weight(case, rng)
    b = rng.standard_normal(case["cout"]).astype(c.dtype) if case["bias"] else None
    kw = {
        k: case[k2]
        for k, k2 in [("stride",) * 2, ("padding",) * 2, ("dilation",) * 2, ("groups",) * 2]
    }

    def fn(x, w, *b):
        return _op("conv")(
            x,
            w,
            **kw,
            padding_mode=case["mode"],
            bias=b[0] if b else None,
            data_format=c.data_format,
        )

    diff = (x, w) if b is None else (x, w, b)
    got, extra = run_jax("conv", fn, diff)
    leaves = [torch_in(x, c), leaf(oihw)] + ([leaf(b)] if b is not None else [])
    yt, err = torch_try(torch_conv, case, *leaves[:2], leaves[2] if b is not None else None)
    if err is not None or isinstance(got, Exception):
        return settle(got, err, "conv")
    cot, grads = extra
    tg = torch_grads(yt, to_torch_layout(cot, c.n, c.data_format), leaves)
    tg[0] = grad_back(tg[0], c)
    if c.data_format == "channels_last":
        tg[1] = np.transpose(tg[1], (*range(2, c.n + 2), 1, 0))
    bounds = conv_bounds(case, x, oihw, b, cot)
    compare(c, ["y", "dx", "dw", "db"], [got, *grads], [torch_out(yt, c), *tg], bounds)
    return "agree"


def test_fuzz_conv():
    run_fuzz("conv", conv_cases(), check_conv)


def transpose_expected(case, yt, wt, bt):
    """PyTorch's transposed convolution for any padding form: VALID output, then crop/extend.

    The VALID output covers padded-input positions ``[0, (o-1)*s + span)``; the adjoint of a conv
    with padding ``(lo, hi)`` and input size ``I`` is that, zero-extended, at ``[lo, lo + I)``.
    """
    c = case["c"]
    s, d = per_axis(case["stride"], c.n), per_axis(case["dilation"], c.n)
    op = per_axis(case["output_padding"], c.n)
    outs = yt.shape[2:]
    if isinstance(case["padding"], str) and case["padding"] == "SAME":
        if any(op):
            raise RuntimeError("output_padding with SAME")
        sizes = tuple(o * si for o, si in zip(outs, s, strict=True))
        pads = resolve_pads("SAME", c.n, sizes, case["kernel"], s, d)
    else:
        pads = resolve_pads(case["padding"], c.n, None, case["kernel"], s, d)
        sizes = tuple(
            (o - 1) * si - lo - hi + di * (k - 1) + p + 1
            for o, si, (lo, hi), di, k, p in zip(outs, s, pads, d, case["kernel"], op, strict=True)
        )
    if any(p >= si and p >= di for p, si, di in zip(op, s, d, strict=True)) or min(sizes) < 1:
        raise RuntimeError("invalid output_padding or output size")
    ct = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[c.n - 1]
    full = ct(yt, wt, None, s, 0, 0, case["groups"], d)
    for axis, ((lo, _), size) in enumerate(zip(pads, sizes, strict=True)):
        ax = 2 + axis
        extra = lo + size - full.shape[ax]
        if extra > 0:
            full = torch.cat(
                [full, full.new_zeros((*full.shape[:ax], extra, *full.shape[ax + 1 :]))], ax
            )
        full = full.narrow(ax, lo, size)
    if bt is not None:
        full = full + bt.reshape((1, -1) + (1,) * c.n)
    return full


def check_conv_transpose(case):
    c = case["c"]
    rng = np.random.default_rng(c.seed)
    y = array(c, case["sizes"], case["cout"], rng)
    w, oihw = conv_weight(case, rng)
    b = rng.standard_normal(case["cin"]).astype(c.dtype) if case["bias"] else None
    kw = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "output_padding")}

    def fn(y, w, *b):
        return _op("conv_transpose")(
            y, w, **kw, bias=b[0] if b else None, data_format=c.data_format
        )

    got, extra = run_jax("conv_transpose", fn, (y, w) if b is None else (y, w, b))
    leaves = [torch_in(y, c), leaf(oihw)] + ([leaf(b)] if b is not None else [])
    bt = leaves[2] if b is not None else None
    out, err = torch_try(transpose_expected, case, *leaves[:2], bt)
    if not isinstance(case["padding"], str) and all(
        isinstance(p, int) for p in per_axis(case["padding"], c.n)
    ):
        ct = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[c.n - 1]
        native, native_err = torch_try(
            ct,
            *leaves[:2],
            bt,
            case["stride"],
            case["padding"],
            case["output_padding"],
            case["groups"],
            case["dilation"],
        )
        if native_err is None and native.numel() == 0:  # PyTorch returns an empty output
            native_err = RuntimeError("output size 0")
        if (native_err is None) != (err is None):
            raise DisagreementError(f"reference and torch differ on validity: {native_err} / {err}")
        if native_err is None:
            close("reference vs torch", out.detach().numpy(), native.detach().numpy(), c.dtype)
    if err is not None or isinstance(got, Exception):
        return settle(got, err, "conv_transpose")
    cot, grads = extra
    tg = torch_grads(out, to_torch_layout(cot, c.n, c.data_format), leaves)
    tg[0] = grad_back(tg[0], c)
    if c.data_format == "channels_last":
        tg[1] = np.transpose(tg[1], (*range(2, c.n + 2), 1, 0))
    compare(c, ["x", "dy", "dw", "db"], [got, *grads], [torch_out(out, c), *tg])
    return "agree"


def test_fuzz_conv_transpose():
    run_fuzz("conv_transpose", conv_cases(transpose=True), check_conv_transpose)


# --- max / avg / Lp pooling ---------------------------------------------------------------------

LP_PS = [1.0, 1.5, 2.0, 3.0, 4.5, math.inf]


@st.composite
def pool_cases(draw, kind):
    c = draw(commons())
    case = {
        "c": c,
        "kind": kind,
        "kernel": tuple(draw(st.integers(1, 4)) for _ in range(c.n)),
        "stride": draw(st.one_of(st.none(), axes_of(c.n, 1, 3))),
        "dilation": 1 if kind == "avg" else draw(axes_of(c.n, 1, 2)),
        "padding": draw(paddings(c.n, 2)),
        "ceil_mode": draw(st.booleans()),
    }
    spans = [
        d * (k - 1) + 1
        for k, d in zip(case["kernel"], per_axis(case["dilation"], c.n), strict=True)
    ]
    top = 7 if c.n < 3 else 5  # mostly windows that fit; some that do not
    case["sizes"] = tuple(draw(st.integers(1, top) | st.integers(sp, sp + 3)) for sp in spans)
    if kind == "avg":
        case["count_include_pad"] = draw(st.booleans())
        case["divisor_override"] = draw(st.one_of(st.none(), st.integers(1, 6)))
    if kind == "lp":
        case["p"] = draw(st.sampled_from(LP_PS))
        case["traced_p"] = draw(st.booleans()) and not math.isinf(case["p"])
        case["positive"] = draw(st.sampled_from([True, True, False]))
    return case


def pool_geometry(case):
    c = case["c"]
    k = case["kernel"]
    s = k if case["stride"] is None else per_axis(case["stride"], c.n)
    d = per_axis(case["dilation"], c.n)
    pads = resolve_pads(case["padding"], c.n, case["sizes"], k, s, d)
    outs = tuple(
        pool_out_size(i, ki, si, lo, hi, di, case["ceil_mode"])
        for i, ki, si, (lo, hi), di in zip(case["sizes"], k, s, pads, d, strict=True)
    )
    return k, s, d, pads, outs


def pool_valid(case, geometry):
    """jaxconv's documented rule: padding at most half the window (avg) or of the dilated span
    (max, Lp) on each side, and at least one output (PyTorch's output-size formula)."""
    k, _, d, pads, outs = geometry
    for ki, di, (lo, hi) in zip(k, d, pads, strict=True):
        half = ki // 2 if case["kind"] == "avg" else (di * (ki - 1) + 1) // 2
        if max(lo, hi) > half:
            return False
    return min(outs) >= 1


def call_pool(case):
    """The jaxconv call of a pooling case, as ``fn(x[, p])``."""
    c, kind = case["c"], case["kind"]
    common = {"stride": case["stride"], "padding": case["padding"], "ceil_mode": case["ceil_mode"]}
    common["data_format"] = c.data_format
    if kind == "max":
        return lambda x: _op("max_pool")(
            x, case["kernel"], dilation=case["dilation"], return_indices=True, **common
        )
    if kind == "avg":
        extra = {k: case[k] for k in ("count_include_pad", "divisor_override")}
        return lambda x: _op("avg_pool")(x, case["kernel"], **extra, **common)
    if case["traced_p"]:
        return lambda x, p: _op("lp_pool")(
            x, p, case["kernel"], dilation=case["dilation"], **common
        )
    return lambda x: _op("lp_pool")(
        x, case["p"], case["kernel"], dilation=case["dilation"], **common
    )


def torch_pool(case, xt, geometry):
    """PyTorch's own op for symmetric padding; ``(values, indices or None)``."""
    c, kind = case["c"], case["kind"]
    k, s, d, pads, _ = geometry
    p = tuple(lo for lo, _ in pads)
    if kind == "max":
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[c.n - 1]
        return fn(xt, k, s, p, d, case["ceil_mode"], return_indices=True)
    if kind == "avg":
        lift = c.n == 1  # avg_pool1d has no divisor_override
        xl = xt.unsqueeze(2) if lift else xt
        k, s, p = ((1, *k), (1, *s), (0, *p)) if lift else (k, s, p)
        fn = (F.avg_pool2d, F.avg_pool3d)[len(k) - 2]
        y = fn(xl, k, s, p, case["ceil_mode"], case["count_include_pad"], case["divisor_override"])
        return (y.squeeze(2) if lift else y), None
    fn = (F.lp_pool1d, F.lp_pool2d, F.lp_pool3d)[c.n - 1]
    k, s = (k[0], s[0]) if c.n == 1 else (k, s)  # lp_pool1d wants ints
    return fn(xt, case["p"], k, s, case["ceil_mode"]), None


def reference_pool(case, xt, pt, geometry):
    """The float64 loop reference of a pooling case; ``(values, indices or None)``."""
    k, s, d, pads, outs = geometry
    wins = windows(case["sizes"], k, s, pads, d, outs)
    if case["kind"] == "max":
        return ref_max(xt, wins, outs)
    if case["kind"] == "lp":
        return ref_lp(xt, pt if pt is not None else case["p"], wins, outs), None
    sums = reduce_windows(xt, wins, outs, lambda v, _: v.sum(-1))
    if case["divisor_override"] is not None:
        return sums / case["divisor_override"], None
    counts = window_counts(case["sizes"], k, s, pads, outs, case["count_include_pad"])
    return sums / torch.tensor(counts, dtype=xt.dtype).reshape(outs), None


def has_empty_window(case, geometry):
    """Whether some window reads padding only (dilated taps straddling a short axis)."""
    k, s, d, pads, outs = geometry
    for i, ki, si, di, (lo, _), o in zip(case["sizes"], k, s, d, pads, outs, strict=True):
        for q in range(max(o, 0)):
            if not any(0 <= q * si - lo + j * di < i for j in range(ki)):
                return True
    return False


def documented_extension(case, geometry):
    """jaxconv accepts more than PyTorch: asymmetric padding; max/Lp padding up to half the
    dilated span (PyTorch: half the kernel); Lp padding, dilation, p = inf, x < 0 (true p-norm).
    Also windows of padding only: the max is -inf with no gradient, while PyTorch's index points
    outside the window (even outside the input) and its backward writes there."""
    k, _, _, pads, _ = geometry
    if any(lo != hi for lo, hi in pads) or has_empty_window(case, geometry):
        return True
    if case["kind"] == "lp":
        return True
    return case["kind"] == "max" and any(lo > ki // 2 for ki, (lo, _) in zip(k, pads, strict=True))


def lp_torch_agrees(case, geometry):
    """Where PyTorch's Lp pooling is the true p-norm: x > 0, finite p, no padding or dilation,
    every window inside the input (PyTorch inflates partial ceil-mode windows)."""
    k, s, d, pads, outs = geometry
    if not case["positive"] or math.isinf(case["p"]) or case["traced_p"] or min(outs) < 1:
        return False
    if any(lo or hi for lo, hi in pads) or any(di != 1 for di in d):
        return False
    return all(
        (o - 1) * si + ki <= i for o, si, ki, i in zip(outs, s, k, case["sizes"], strict=True)
    )


def pool_expect(case, x, geometry, use_reference):
    """``(values, indices or None, torch leaves)`` of the oracle (PyTorch's layout), or
    ``(error, None, None)``."""
    c = case["c"]
    xt = torch_in(x, c)
    leaves = [xt]
    pt = None
    if case["kind"] == "lp" and case["traced_p"]:
        pt = torch.tensor(case["p"], dtype=xt.dtype, requires_grad=True)
        leaves.append(pt)
    if use_reference:
        y, idx = reference_pool(case, xt, pt, geometry)
    else:
        out, err = torch_try(torch_pool, case, xt, geometry)
        if err is not None:
            return err, None, None
        y, idx = out
    return y, idx, leaves


def check_pool(case):
    c, kind = case["c"], case["kind"]
    fname = {"max": "max_pool", "avg": "avg_pool", "lp": "lp_pool"}[kind]
    geometry = pool_geometry(case)
    x = array(c, case["sizes"], positive=case.get("positive", False))
    diff = (x, np.asarray(case["p"], c.dtype)) if case.get("traced_p") else (x,)
    got, extra = run_jax(fname, call_pool(case), diff)
    outcome = "agree"
    use_reference = documented_extension(case, geometry)
    if not use_reference:
        y, idx, leaves = pool_expect(case, x, geometry, False)
        if isinstance(y, Exception):
            if not isinstance(got, Exception) and pool_valid(case, geometry):
                # max: padding up to half the span, not half the kernel; avg_pool3d alone
                # rejects a ceil-mode window longer than the input that its 1-D/2-D accept
                use_reference = (kind == "max" and "pad" in str(y)) or (
                    "smaller than kernel size" in str(y)
                )
            if not use_reference:
                return settle(got, y, fname)
    if use_reference:
        outcome = "reference"
        if not pool_valid(case, geometry):
            return settle(got, RuntimeError("invalid by the documented rule"), fname)
        if isinstance(got, Exception):
            raise DisagreementError(f"jaxconv rejects a valid configuration: {got}")
        y, idx, leaves = pool_expect(case, x, geometry, True)
    if isinstance(got, Exception):
        raise DisagreementError(f"jaxconv rejects what the oracle accepts: {got}")
    compare_pool(case, got, extra, y, idx, leaves)
    if kind == "lp" and lp_torch_agrees(case, geometry):
        y, _, leaves = pool_expect(case, x, geometry, False)
        compare_pool(case, got, extra, y, None, leaves)
        outcome = "agree"
    return outcome


def compare_pool(case, got, extra, y, idx, leaves):
    c = case["c"]
    cot, grads = extra
    values = got[0] if isinstance(got, tuple) else got
    tg = torch_grads(y, to_torch_layout(cot, c.n, c.data_format), leaves)
    tg[0] = grad_back(tg[0], c)
    want = [torch_out(y, c), *tg]
    compare(c, ["values", "dx", "dp"], [values, *grads], want)
    if idx is not None:  # the references mark windows of padding only with -1: no index
        want_idx = torch_out(idx, c)
        real = want_idx >= 0
        close("indices", np.asarray(got[1])[real], want_idx[real], c.dtype)


def test_fuzz_max_pool():
    _op("max_pool")
    run_fuzz("max_pool", pool_cases("max"), check_pool)


def test_fuzz_avg_pool():
    _op("avg_pool")
    run_fuzz("avg_pool", pool_cases("avg"), check_pool)


def test_fuzz_lp_pool():
    _op("lp_pool")
    run_fuzz("lp_pool", pool_cases("lp"), check_pool)


# --- adaptive pooling ---------------------------------------------------------------------------


@st.composite
def adaptive_cases(draw, kind):
    c = draw(commons())
    return {
        "c": c,
        "kind": kind,
        "sizes": sizes_for(draw, c.n),
        "output_size": tuple(draw(st.one_of(st.none(), st.integers(1, 8))) for _ in range(c.n)),
    }


def check_adaptive(case):
    c, kind = case["c"], case["kind"]
    fname = f"adaptive_{kind}_pool"
    x = array(c, case["sizes"])
    if kind == "max":

        def fn(x):
            return _op(fname)(
                x, case["output_size"], return_indices=True, data_format=c.data_format
            )

    else:

        def fn(x):
            return _op(fname)(x, case["output_size"], data_format=c.data_format)

    got, extra = run_jax(fname, fn, (x,))
    xt = torch_in(x, c)
    out = tuple(
        i if o is None else o for o, i in zip(case["output_size"], case["sizes"], strict=True)
    )
    if kind == "max":
        torch_fn = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[c.n - 1]
        res, err = torch_try(torch_fn, xt, out if c.n > 1 else out[0], True)
    else:
        torch_fn = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[c.n - 1]
        res, err = torch_try(lambda: (torch_fn(xt, out if c.n > 1 else out[0]), None))
    if err is not None or isinstance(got, Exception):
        return settle(got, err, fname)
    compare_pool(case, got, extra, res[0], res[1], [xt])
    return "agree"


def test_fuzz_adaptive_avg_pool():
    _op("adaptive_avg_pool")
    run_fuzz("adaptive_avg_pool", adaptive_cases("avg"), check_adaptive)


def test_fuzz_adaptive_max_pool():
    _op("adaptive_max_pool")
    run_fuzz("adaptive_max_pool", adaptive_cases("max"), check_adaptive)


# --- fractional max pooling ---------------------------------------------------------------------

RATIOS = [0.3, 0.5, 0.6, 0.75, 0.9]


@st.composite
def fractional_cases(draw):
    c = draw(commons())
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(c.n))
    sizes = tuple(draw(st.integers(k, k + (5 if c.n < 3 else 3))) for k in kernel)
    if draw(st.booleans()):
        outs = tuple(draw(st.integers(1, i)) for i in sizes)
        target = {"output_size": outs if c.n > 1 or draw(st.booleans()) else outs[0]}
    else:
        ratios = tuple(draw(st.sampled_from(RATIOS)) for _ in range(c.n))
        target = {"output_ratio": ratios if draw(st.booleans()) else ratios[0]}
    return {"c": c, "kernel": kernel, "sizes": sizes, "target": target}


def fractional_outs(case):
    n = case["c"].n
    if "output_size" in case["target"]:
        return per_axis(case["target"]["output_size"], n)
    ratios = per_axis(case["target"]["output_ratio"], n)
    return tuple(int(i * r) for i, r in zip(case["sizes"], ratios, strict=True))


def fractional_reference(case, xt, samples, outs):
    """Max and flat argmax over each (row, channel)'s own windows; float64 loops."""
    c = case["c"]
    flat = xt.reshape(xt.shape[0] * xt.shape[1], -1)
    rows = samples.reshape(-1, c.n)
    strides = [math.prod(case["sizes"][a + 1 :]) for a in range(c.n)]
    values, indices = [], []
    for r in range(flat.shape[0]):
        axes = [
            fractional_starts(i, o, k, rows[r, a], c.dtype)
            for a, (i, o, k) in enumerate(zip(case["sizes"], outs, case["kernel"], strict=True))
        ]
        wins = []
        for starts in itertools.product(*axes):
            taps = itertools.product(
                *[range(s0, s0 + k) for s0, k in zip(starts, case["kernel"], strict=True)]
            )
            wins.append([sum(t * s for t, s in zip(tap, strides, strict=True)) for tap in taps])
        v, i = ref_max(flat[r][None, None], wins, outs)
        values.append(v[0, 0])
        indices.append(i[0, 0])
    shape = (*xt.shape[:2], *outs)
    return torch.stack(values).reshape(shape), torch.stack(indices).reshape(shape)


def check_fractional(case):
    c = case["c"]
    rng = np.random.default_rng(c.seed)
    x = array(c, case["sizes"], rng=rng)
    samples = rng.uniform(size=(*c.batch, c.channels, c.n)).astype(c.dtype)

    def fn(x, samples):
        return _op("fractional_max_pool")(
            x,
            case["kernel"],
            **case["target"],
            samples=samples,
            return_indices=True,
            data_format=c.data_format,
        )

    got, extra = run_jax("fractional_max_pool", fn, (x,), (jnp.asarray(samples),))
    outs = fractional_outs(case)
    valid = all(
        o >= 1 and o + k - 1 <= i
        for o, k, i in zip(outs, case["kernel"], case["sizes"], strict=True)
    )
    xt = torch_in(x, c)
    err, outcome = None, "agree"
    if c.n > 1:
        torch_fn = (F.fractional_max_pool2d, F.fractional_max_pool3d)[c.n - 2]
        ts = torch.from_numpy(
            samples.reshape(-1, c.channels, c.n)[..., :: -1 if c.n == 2 else 1].copy()
        )
        target = {k: per_axis(v, c.n) for k, v in case["target"].items()}  # scalars break 2-D
        res, err = torch_try(
            lambda: torch_fn(xt, case["kernel"], **target, return_indices=True, _random_samples=ts)
        )
        if err is None and res[0].numel() == 0:  # PyTorch returns an empty output for out = 0
            err = RuntimeError("empty output")
    if c.n == 1 or (err is not None and c.n == 3 and valid and not isinstance(got, Exception)):
        outcome = "reference"  # 1-D, or 3-D with out + k - 1 == in (PyTorch's stricter check)
        err = None if valid else RuntimeError("invalid by the documented rule")
        if valid:
            res = fractional_reference(case, xt, samples, outs)
    if err is not None or isinstance(got, Exception):
        return settle(got, err, "fractional_max_pool")
    compare_pool(case, got, extra, res[0], res[1], [xt])
    return outcome


def test_fuzz_fractional_max_pool():
    _op("fractional_max_pool")
    run_fuzz("fractional_max_pool", fractional_cases(), check_fractional)


# --- max unpooling ------------------------------------------------------------------------------


@st.composite
def unpool_cases(draw):
    c = draw(commons())
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(c.n))
    pad = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    stride = draw(st.one_of(st.none(), axes_of(c.n, 1, 3)))
    s = kernel if stride is None else per_axis(stride, c.n)
    return {
        "c": c,
        "kernel": kernel,
        "stride": stride,
        "padding": pad if draw(st.booleans()) or len(set(pad)) > 1 else pad[0],
        "sizes": tuple(draw(st.integers(k, k + (4 if c.n < 3 else 2))) for k in kernel),
        "delta": None if draw(st.booleans()) else tuple(draw(st.integers(0, si - 1)) for si in s),
        "index_dtype": draw(st.sampled_from(["int32", "int64"])),
    }


def check_unpool(case):
    c = case["c"]
    k, pad = case["kernel"], per_axis(case["padding"], c.n)
    s = k if case["stride"] is None else per_axis(case["stride"], c.n)
    x = array(c, case["sizes"])
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[c.n - 1]
    values, idx = pool(
        torch.from_numpy(to_torch_layout(x, c.n, c.data_format)), k, s, pad, 1, False, True
    )
    default = tuple(
        (v - 1) * si - 2 * p + ki for v, si, p, ki in zip(values.shape[2:], s, pad, k, strict=True)
    )
    out_size = None
    if case["delta"] is not None:
        out_size = tuple(o + dl for o, dl in zip(default, case["delta"], strict=True))
    assume(int(idx.max()) < math.prod(out_size or default))  # indices are data: unchecked
    v = from_torch_layout(values.numpy(), c.batch, c.n, c.data_format)
    i = jnp.asarray(
        from_torch_layout(idx.numpy(), c.batch, c.n, c.data_format), case["index_dtype"]
    )

    def fn(v, i):
        return _op("max_unpool")(
            v,
            i,
            k,
            case["stride"],
            case["padding"],
            output_size=out_size,
            data_format=c.data_format,
        )

    got, extra = run_jax("max_unpool", fn, (v,), (i,))
    vt = leaf(values.detach().numpy())
    unpool = (F.max_unpool1d, F.max_unpool2d, F.max_unpool3d)[c.n - 1]
    res, err = torch_try(lambda: unpool(vt, idx, k, s, pad, out_size))
    if err is not None or isinstance(got, Exception):
        return settle(got, err, "max_unpool")
    cot, grads = extra
    res.backward(torch.from_numpy(to_torch_layout(cot, c.n, c.data_format).copy()))
    want = vt.grad.numpy() * last_of_duplicates(idx.numpy())
    compare(c, ["y", "dx"], [got, *grads], [torch_out(res, c), grad_back(want, c)])
    return "reference" if (want != vt.grad.numpy()).any() else "agree"


def last_of_duplicates(idx):
    """1 where an index is the last (row-major) of its plane to name its output position.

    jaxconv's documented rule: overlapping windows can repeat an index; the last write wins (as
    PyTorch's CPU kernel), and the earlier duplicates get no gradient (PyTorch gathers the
    cotangent for every duplicate).
    """
    planes = idx.reshape(idx.shape[0] * idx.shape[1], -1)
    keep = np.zeros(planes.shape)
    for r, plane in enumerate(planes):
        _, first_of_reversed = np.unique(plane[::-1], return_index=True)
        keep[r, plane.size - 1 - first_of_reversed] = 1
    return keep.reshape(idx.shape)


def test_fuzz_max_unpool():
    _op("max_unpool")
    run_fuzz("max_unpool", unpool_cases(), check_unpool)

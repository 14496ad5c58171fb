"""Differential fuzzing of pooling against PyTorch CPU, and float64 loop references where jaxconv
accepts more: max, avg and Lp pooling, adaptive and fractional max pooling.

One test per op draws random configurations with hypothesis (derandomized): dims 1-3, shapes,
windows, strides, every padding form, dilations, ceil_mode, divisor rules, data formats, batch
shapes, float32/float64. See ``fuzz_support`` for the outcome classes and the draw count
(``JAXCONV_FUZZ_EXAMPLES``; ``make fuzz`` runs 10,000 per op and prints a summary), and
``fuzz_common`` for how each draw runs.
"""

import itertools
import math

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from fuzz_common import (
    array,
    axes_of,
    commons,
    compare,
    grad_back,
    jaxconv_op,
    paddings,
    per_axis,
    run_jax,
    settle,
    sizes_for,
    torch_grads,
    torch_in,
    torch_out,
    torch_try,
)
from fuzz_support import (
    DisagreementError,
    close,
    fractional_starts,
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
from hypothesis import strategies as st

torch.set_num_threads(1)


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
        return lambda x: jaxconv_op("max_pool")(
            x, case["kernel"], dilation=case["dilation"], return_indices=True, **common
        )
    if kind == "avg":
        extra = {k: case[k] for k in ("count_include_pad", "divisor_override")}
        return lambda x: jaxconv_op("avg_pool")(x, case["kernel"], **extra, **common)
    if case["traced_p"]:
        return lambda x, p: jaxconv_op("lp_pool")(
            x, p, case["kernel"], dilation=case["dilation"], **common
        )
    return lambda x: jaxconv_op("lp_pool")(
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
    jaxconv_op("max_pool")
    run_fuzz("max_pool", pool_cases("max"), check_pool)


def test_fuzz_avg_pool():
    jaxconv_op("avg_pool")
    run_fuzz("avg_pool", pool_cases("avg"), check_pool)


def test_fuzz_lp_pool():
    jaxconv_op("lp_pool")
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
            return jaxconv_op(fname)(
                x, case["output_size"], return_indices=True, data_format=c.data_format
            )

    else:

        def fn(x):
            return jaxconv_op(fname)(x, case["output_size"], data_format=c.data_format)

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
    jaxconv_op("adaptive_avg_pool")
    run_fuzz("adaptive_avg_pool", adaptive_cases("avg"), check_adaptive)


def test_fuzz_adaptive_max_pool():
    jaxconv_op("adaptive_max_pool")
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
        return jaxconv_op("fractional_max_pool")(
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
    jaxconv_op("fractional_max_pool")
    run_fuzz("fractional_max_pool", fractional_cases(), check_fractional)

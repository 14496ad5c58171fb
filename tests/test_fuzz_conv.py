"""Differential fuzzing of conv, conv_transpose and max_unpool against PyTorch CPU.

One test per op draws random configurations with hypothesis (derandomized): dims 1-3, shapes,
kernels, strides, every padding form and padding mode, dilations, groups, output paddings, bias,
unpooling output sizes and index dtypes, data formats, batch shapes, float32/float64. The outcome
classes and the draw count are those of ``fuzz_support``; ``fuzz_common`` runs each draw.
"""

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
    leaf,
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
    from_torch_layout,
    resolve_pads,
    run_fuzz,
    to_torch_layout,
)
from hypothesis import assume
from hypothesis import strategies as st

torch.set_num_threads(1)


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
        return jaxconv_op("conv")(
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
        return jaxconv_op("conv_transpose")(
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
        return jaxconv_op("max_unpool")(
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
    jaxconv_op("max_unpool")
    run_fuzz("max_unpool", unpool_cases(), check_unpool)

"""A catalogue of bad inputs across the public API.

Every case must raise ValueError or TypeError whose message starts with the public function's
name and names the offending argument; never AssertionError, IndexError, ZeroDivisionError or an
XLA error. Each case runs eagerly and, where it takes arrays, under ``jax.jit`` with the arrays
traced: the error must come at trace time.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv

X = np.ones((1, 5, 5, 2), np.float32)  # channels_last, 2-D
W = np.ones((3, 3, 2, 4), np.float32)  # HWIO
X1 = np.ones((2, 6, 3), np.float32)  # channels_last, 1-D
SAMPLES = np.full((2, 3, 1), 0.5, np.float32)
KEY = jax.random.key(0)


def _call(name, args, kwargs):
    """``fn(arrays, kw_arrays)`` calling ``jaxconv.<name>``; the arrays are traced under jit."""

    def fn(arrays, kw_arrays):
        return getattr(jaxconv, name)(*arrays, *args[len(arrays) :], **kwargs, **kw_arrays)

    return fn


def case(name, arg, *args, n_arrays=1, traced_kw=(), id=None, **kwargs):
    """A bad call of ``jaxconv.<name>`` whose error must name ``arg`` (a regex of names).

    The first ``n_arrays`` positional arguments and the keywords in ``traced_kw`` are traced
    under ``jax.jit``.
    """
    return pytest.param(name, arg, args, kwargs, (n_arrays, traced_kw), id=id)


CASES = [
    # conv
    case("conv", "x", np.ones((5, 2), np.float32), W, n_arrays=2, id="conv-x-rank"),
    case("conv", "w", X, np.ones((3, 2), np.float32), n_arrays=2, id="conv-w-rank"),
    case("conv", "x", np.ones((1, 5, 5, 2), np.int32), W, n_arrays=2, id="conv-int-x"),
    case("conv", "w", X, W.astype(np.float64), n_arrays=2, id="conv-dtype-mismatch"),
    case("conv", "x|w|groups", X, np.ones((3, 3, 1, 4), np.float32), n_arrays=2, id="conv-ch"),
    case("conv", "groups", X, W, n_arrays=2, groups=0, id="conv-groups-0"),
    case("conv", "groups", X, W, n_arrays=2, groups=1.0, id="conv-groups-float"),
    case("conv", "groups", X, W, n_arrays=2, groups=True, id="conv-groups-bool"),
    case("conv", "groups", X, np.ones((3, 3, 1, 3), np.float32), n_arrays=2, groups=2, id="conv-g"),
    case("conv", "stride", X, W, n_arrays=2, stride="2", id="conv-stride-str"),
    case("conv", "stride", X, W, n_arrays=2, stride=0, id="conv-stride-0"),
    case("conv", "stride", X, W, n_arrays=2, stride=1.5, id="conv-stride-float"),
    case("conv", "stride", X, W, n_arrays=2, stride=True, id="conv-stride-bool"),
    case("conv", "stride", X, W, n_arrays=2, stride=(1, 1, 1), id="conv-stride-len"),
    case("conv", "dilation", X, W, n_arrays=2, dilation=0, id="conv-dilation-0"),
    case("conv", "dilation", X, W, n_arrays=2, dilation=(1, -1), id="conv-dilation-neg"),
    case("conv", "padding", X, W, n_arrays=2, padding=-1, id="conv-padding-neg"),
    case("conv", "padding", X, W, n_arrays=2, padding=((0, -1), (0, 0)), id="conv-pad-pair"),
    case("conv", "padding", X, W, n_arrays=2, padding="HALF", id="conv-padding-str"),
    case("conv", "padding", X, W, n_arrays=2, padding=1.0, id="conv-padding-float"),
    case("conv", "padding", X, W, n_arrays=2, padding=((1, 1),), id="conv-padding-pairs-len"),
    case("conv", "padding_mode", X, W, n_arrays=2, padding_mode="mirror", id="conv-pad-mode"),
    case(
        "conv",
        "padding",
        np.ones((1, 2, 2, 2), np.float32),
        W,
        n_arrays=2,
        padding=2,
        padding_mode="reflect",
        id="conv-reflect-too-large",
    ),
    case(
        "conv",
        "padding",
        np.ones((1, 2, 2, 2), np.float32),
        W,
        n_arrays=2,
        padding=3,
        padding_mode="circular",
        id="conv-circular-too-large",
    ),
    case("conv", "w|kernel|window", np.ones((1, 2, 2, 2), np.float32), W, n_arrays=2, id="conv-k"),
    case("conv", "x", np.ones((1, 0, 5, 2), np.float32), W, n_arrays=2, id="conv-zero-size"),
    case("conv", "data_format", X, W, n_arrays=2, data_format="NHWC", id="conv-data-format"),
    case("conv", "bias", X, W, n_arrays=2, bias=np.ones(3, np.float32), traced_kw=("bias",)),
    case("conv", "bias", X, W, n_arrays=2, bias=np.ones(4, np.int32), traced_kw=("bias",)),
    # conv_transpose
    case("conv_transpose", "y", np.ones((1, 3, 3, 2), np.float32), W, n_arrays=2, id="ct-ch"),
    case(
        "conv_transpose",
        "output_padding",
        np.ones((1, 3, 3, 4), np.float32),
        W,
        n_arrays=2,
        output_padding=1,
        id="ct-output-padding",
    ),
    case(
        "conv_transpose",
        "padding",
        np.ones((1, 1, 1, 4), np.float32),
        W,
        n_arrays=2,
        padding=2,
        id="ct-padding-too-large",
    ),
    case(
        "conv_transpose",
        "output_padding",
        np.ones((1, 3, 3, 4), np.float32),
        W,
        n_arrays=2,
        stride=2,
        padding="SAME",
        output_padding=1,
        id="ct-same-output-padding",
    ),
    case(
        "conv_transpose",
        "groups",
        np.ones((1, 3, 3, 4), np.float32),
        W,
        n_arrays=2,
        groups=3,
        id="ct-groups",
    ),
    case("conv_transpose", "y", np.ones((3, 4), np.float32), W, n_arrays=2, id="ct-y-rank"),
    # output-size arithmetic
    case("conv_output_size", "size", 0, 3, n_arrays=0, id="out-size-0"),
    case("conv_output_size", "kernel", 5, 0, n_arrays=0, id="out-kernel-0"),
    case("conv_output_size", "kernel", 5, "3", n_arrays=0, id="out-kernel-str"),
    case("conv_output_size", "stride", 5, 3, stride=-1, n_arrays=0, id="out-stride-neg"),
    case("conv_output_size", "padding", (5, 5), 3, padding=((1, 1),), n_arrays=0, id="out-pairs"),
    case("conv_output_size", "ceil_mode", 5, 2, ceil_mode="no", n_arrays=0, id="out-ceil-str"),
    case("conv", "padding", X[:, 0], W[0], padding=(1, 2), n_arrays=2, id="conv-1d-bare-pair"),
    case("conv_output_size", "window|kernel|padding", 2, 5, n_arrays=0, id="out-window-large"),
    case("conv_transpose_output_size", "padding", 5, 3, padding="HALF", n_arrays=0, id="cto-half"),
    case("conv_transpose_output_size", "output_padding", 5, 3, output_padding=1, n_arrays=0),
    # max_pool
    case("max_pool", "window", X, 2, id="max-window-int"),
    case("max_pool", "window", X, (2.0, 2.0), id="max-window-float"),
    case("max_pool", "window", X, (), id="max-window-empty"),
    case("max_pool", "window", X, (0, 2), id="max-window-0"),
    case("max_pool", "window", X, "22", id="max-window-str"),
    case("max_pool", "padding", X, (2, 2), padding=2, id="max-padding-half"),
    case("max_pool", "padding", X, (3, 3), padding="same-ish", id="max-padding-str"),
    case("max_pool", "x", np.ones(5, np.float32), (2, 2), id="max-x-rank"),
    case("max_pool", "x", np.ones((1, 5, 5, 2), np.int32), (2, 2), id="max-int-x"),
    case("max_pool", "x", np.ones((1, 5, 5, 2), bool), (2, 2), id="max-bool-x"),
    case("max_pool", "ceil_mode", X, (2, 2), ceil_mode="yes", id="max-ceil-str"),
    case("max_pool", "return_indices", X, (2, 2), return_indices=1, id="max-return-int"),
    case("max_pool", "window|x", np.ones((1, 2, 2, 1), np.float32), (3, 3), id="max-too-large"),
    case("max_pool", "dilation", X, (2, 2), dilation=0, id="max-dilation-0"),
    case("max_pool", "stride", X, (2, 2), stride=(1, "1"), id="max-stride-str"),
    case("max_pool", "stride", X, (2, 2), stride=(1, 1, 1), id="max-stride-len"),
    case("max_pool", "data_format", X, (2, 2), data_format="NCHW", id="max-data-format"),
    case("max_pool", "x", None, (2, 2), n_arrays=0, id="max-x-none"),
    case("max_pool", "x", X.astype(jnp.float8_e4m3fn), (2, 2), id="max-float8-x"),
    case("max_pool", "stride", X, (2, 2), stride=2**70, id="max-stride-huge"),
    case("max_pool", "data_format", X, (2, 2), data_format=np.array("channels_last"), id="max-df"),
    case("avg_pool", "stride", X, (2, 2), stride=(1, 2**64), id="avg-stride-huge"),
    case("lp_pool", "stride", X, 2.0, (2, 2), stride=2**70, id="lp-stride-huge"),
    case("conv", "stride", X, W, n_arrays=2, stride=2**70, id="conv-stride-huge"),
    case("adaptive_avg_pool", "output_size", X, (2**40, 1), id="adaptive-avg-huge"),
    case("adaptive_max_pool", "output_size", X, (1, 2**62), id="adaptive-max-huge"),
    case("avg_pool", "x", "abc", (2, 2), n_arrays=0, id="avg-x-str"),
    case("conv", "w", X, None, id="conv-w-none"),
    case("max_unpool", "indices", X, "i", (2, 2), id="unpool-indices-str"),
    case("max_unpool", "indices", X[:, :1, :1, :1], [[[[2**70]]]], (2, 2), id="unpool-huge-int"),
    case("max_pool", "x", [[[[2**70]]]], (1, 1), n_arrays=0, id="max-huge-int-x"),
    case("adaptive_max_pool", "x", [[1.0], [1.0, 2.0]], (1,), n_arrays=0, id="adaptive-ragged"),
    # avg_pool
    case("avg_pool", "padding", X, (2, 2), padding=2, id="avg-padding-half"),
    case("avg_pool", "padding", X, (3, 3), padding=(1, 2), id="avg-padding-axis"),
    case("avg_pool", "divisor_override", X, (2, 2), divisor_override=0, id="avg-divisor-0"),
    case("avg_pool", "divisor_override", X, (2, 2), divisor_override=1.5, id="avg-divisor-f"),
    case("avg_pool", "count_include_pad", X, (2, 2), count_include_pad="no", id="avg-cip"),
    case("avg_pool", "x", np.ones((1, 5, 5, 2), np.int8), (2, 2), id="avg-int-x"),
    case("avg_pool", "window|x", X1, (7,), id="avg-window-large"),
    case("avg_pool", "x", np.ones((1, 0, 2), np.float32), (1,), id="avg-zero-size"),
    # lp_pool
    case("lp_pool", "p", X, 0.5, (2, 2), id="lp-p-small"),
    case("lp_pool", "p", X, float("nan"), (2, 2), id="lp-p-nan"),
    case("lp_pool", "p", X, -float("inf"), (2, 2), id="lp-p-neg-inf"),
    case("lp_pool", "p", X, "2", (2, 2), id="lp-p-str"),
    case("lp_pool", "p", X, True, (2, 2), id="lp-p-bool"),
    case("lp_pool", "p", X, np.asarray(2, np.int32), (2, 2), n_arrays=2, id="lp-p-int-array"),
    case("lp_pool", "p", X, np.ones(2, np.float32), (2, 2), n_arrays=2, id="lp-p-vector"),
    case("lp_pool", "padding", X, 2.0, (2, 2), padding=2, id="lp-padding-half"),
    case("lp_pool", "window", X, 2.0, 2, id="lp-window-int"),
    # max_unpool
    case("max_unpool", "indices", X, X, (2, 2), n_arrays=2, id="unpool-float-indices"),
    case(
        "max_unpool",
        "indices",
        X,
        np.zeros((1, 4, 4, 2), np.int32),
        (2, 2),
        n_arrays=2,
        id="unpool-indices-shape",
    ),
    case(
        "max_unpool",
        "output_size",
        X,
        np.zeros(X.shape, np.int32),
        (2, 2),
        n_arrays=2,
        output_size=(10,),
        id="unpool-output-size-len",
    ),
    case(
        "max_unpool",
        "output_size",
        X,
        np.zeros(X.shape, np.int32),
        (2, 2),
        n_arrays=2,
        output_size=(3, 3),
        id="unpool-output-size-small",
    ),
    case(
        "max_unpool",
        "x",
        np.ones((1, 5, 5, 2), np.int32),
        np.zeros(X.shape, np.int32),
        (2, 2),
        n_arrays=2,
        id="unpool-int-x",
    ),
    # adaptive pooling
    case("adaptive_avg_pool", "output_size", X, (0, 2), id="aavg-output-0"),
    case("adaptive_avg_pool", "output_size", X, 2, id="aavg-output-int"),
    case("adaptive_avg_pool", "output_size", X, (2.5, 2), id="aavg-output-float"),
    case("adaptive_avg_pool", "x", np.ones((1, 5, 5, 2), np.int32), (2, 2), id="aavg-int-x"),
    case("adaptive_avg_pool", "data_format", X, (2, 2), data_format="nhwc", id="aavg-format"),
    case("adaptive_max_pool", "output_size", X, (-1, 2), id="amax-output-neg"),
    case("adaptive_max_pool", "return_indices", X, (2, 2), return_indices="y", id="amax-ret"),
    case("adaptive_max_pool", "x|output_size", np.ones((5,), np.float32), (2, 2), id="amax-rank"),
    # fractional_max_pool
    case("fractional_max_pool", "output_size|output_ratio", X1, (2,), samples=SAMPLES, id="f-none"),
    case(
        "fractional_max_pool",
        "output_size|output_ratio",
        X1,
        (2,),
        output_size=(3,),
        output_ratio=0.5,
        samples=SAMPLES,
        id="frac-both-targets",
    ),
    case("fractional_max_pool", "output_ratio", X1, (2,), output_ratio=1.5, samples=SAMPLES),
    case("fractional_max_pool", "output_ratio", X1, (2,), output_ratio=0.0, samples=SAMPLES),
    case("fractional_max_pool", "output_ratio", X1, (2,), output_ratio="half", samples=SAMPLES),
    case("fractional_max_pool", "output_size", X1, (2,), output_size=(6,), samples=SAMPLES),
    case("fractional_max_pool", "output_size", X1, (2,), output_size=(0,), samples=SAMPLES),
    case("fractional_max_pool_graham", "output_size", X1, output_size=(7,), key=KEY, id="g-big"),
    case("fractional_max_pool_graham", "output_ratio", X1, output_ratio=0.5, key=KEY, id="g-ratio"),
    case(
        "fractional_max_pool_graham", "output_ratio", X, output_ratio=(0.5, None), key=KEY, id="g-n"
    ),
    case("fractional_max_pool", "key|samples", X1, (2,), output_size=(3,), id="frac-no-samples"),
    case(
        "fractional_max_pool",
        "key|samples",
        X1,
        (2,),
        output_size=(3,),
        samples=SAMPLES,
        key=jax.random.key(0),
        id="frac-key-and-samples",
    ),
    case(
        "fractional_max_pool",
        "samples",
        X1,
        (2,),
        output_size=(3,),
        samples=np.full((2, 3, 2), 0.5, np.float32),
        id="frac-samples-shape",
    ),
    case(
        "fractional_max_pool",
        "samples",
        X1,
        (2,),
        output_size=(3,),
        samples=np.full((2, 3, 1), 1.5, np.float32),
        id="frac-samples-range",
    ),
    case("fractional_max_pool", "key", X1, (2,), output_size=(3,), key=0, id="frac-key-int"),
    case("fractional_max_pool", "window", X1, (7,), output_size=(1,), samples=SAMPLES),
    case("fractional_max_pool", "window", X1, 2, output_size=(3,), samples=SAMPLES, id="f-w-int"),
]

FORBIDDEN = (AssertionError, IndexError, ZeroDivisionError, KeyError, AttributeError)


def _check_error(err: BaseException, name: str, arg: str) -> None:
    assert isinstance(err, (ValueError, TypeError)), f"{type(err).__name__}: {err}"
    assert not isinstance(err, FORBIDDEN), f"{type(err).__name__}: {err}"
    assert "XlaRuntimeError" not in type(err).__name__, err
    message = str(err)
    assert re.match(rf"{name}: ", message), f"message does not start with '{name}: ': {message}"
    assert re.search(rf"`?\b({arg})\b`?", message), f"message does not name {arg!r}: {message}"


def _run(name, args, kwargs, traced, jit):
    if not hasattr(jaxconv, name):
        pytest.skip(f"jaxconv.{name} is not available")
    n_arrays, traced_kw = traced
    arrays = tuple(jnp.asarray(a) for a in args[:n_arrays])
    kw_arrays = {k: jnp.asarray(kwargs[k]) for k in traced_kw}
    fn = _call(name, args, {k: v for k, v in kwargs.items() if k not in traced_kw})
    with pytest.raises(Exception) as info:
        out = jax.jit(fn)(arrays, kw_arrays) if jit else fn(arrays, kw_arrays)
        jax.block_until_ready(out)
    return info.value


@pytest.mark.parametrize(("name", "arg", "args", "kwargs", "traced"), CASES)
def test_bad_input_eager(name, arg, args, kwargs, traced):
    _check_error(_run(name, args, kwargs, traced, jit=False), name, arg)


@pytest.mark.parametrize(
    ("name", "arg", "args", "kwargs", "traced"), [c for c in CASES if c.values[4] != (0, ())]
)
def test_bad_input_at_trace_time(name, arg, args, kwargs, traced):
    """The same errors under jax.jit (cases with no array argument cannot be traced)."""
    _check_error(_run(name, args, kwargs, traced, jit=True), name, arg)


BIG = jax.ShapeDtypeStruct((1, 50000, 50000, 1), jnp.float32)  # 2.5e9 > 2**31 - 1 positions


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("max_pool", lambda x: jaxconv.max_pool(x, (2, 2), return_indices=True)),
        ("adaptive_max_pool", lambda x: jaxconv.adaptive_max_pool(x, (2, 2), return_indices=True)),
        (
            "fractional_max_pool",
            lambda x: jaxconv.fractional_max_pool(
                x, (2, 2), output_size=(3, 3), key=jax.random.key(0), return_indices=True
            ),
        ),
        (
            "fractional_max_pool_graham",
            lambda x: jaxconv.fractional_max_pool_graham(
                x, output_size=(3, 3), key=jax.random.key(0), return_indices=True
            ),
        ),
    ],
)
def test_int32_indices_need_a_volume_that_fits(name, call):
    """Indices are int32 flat positions: a larger spatial volume raises instead of wrapping."""
    with pytest.raises(ValueError, match=rf"^{name}: `return_indices=True` needs a spatial volume"):
        jax.eval_shape(call, BIG)


def test_without_indices_a_large_volume_is_fine():
    assert jax.eval_shape(lambda x: jaxconv.adaptive_max_pool(x, (2, 2)), BIG).shape == (1, 2, 2, 1)


@pytest.mark.parametrize(
    "name, arg, call",
    [
        ("max_pool", "window", lambda: jaxconv.max_pool(X, (2, 6))),
        ("avg_pool", "window", lambda: jaxconv.avg_pool(X, (2, 6))),
        ("lp_pool", "window", lambda: jaxconv.lp_pool(X, 2.0, (2, 6))),
        ("conv", "w", lambda: jaxconv.conv(X, np.ones((2, 6, 2, 1), np.float32))),
        ("conv_output_size", "kernel", lambda: jaxconv.conv_output_size((5, 5), (2, 6))),
    ],
)
def test_a_window_longer_than_the_padded_input_names_its_argument_and_axis(name, arg, call):
    want = rf"^{name}: `{arg}` gives a window \(kernel 6, dilation 1, span 6\) larger than the "
    with pytest.raises(ValueError, match=want + r"padded input on spatial axis 1 \(5 \+ padding"):
        call()


def test_graham_names_no_window():
    """Graham's regions have no window: an output longer than the input says so."""
    with pytest.raises(ValueError, match=r"output size 7 exceeds spatial axis 0 of size 6") as e:
        jaxconv.fractional_max_pool_graham(X1, output_size=(7,), key=KEY)
    assert "window" not in str(e.value)


def test_catalogue_size():
    assert len(CASES) >= 50

"""Output-size arithmetic against the seed and PyTorch's pooling and transposed-conv shapes."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxconv
from jaxconv import conv_output_size, conv_transpose_output_size

_RNG_SEED = 20190208


def test_seed_output_size():
    # seed 1.1 (a)/(b): I=5, K=3, P=0, S=1 gives O = floor((5 + 0 - 3)/1) + 1 = 3
    assert conv_output_size(5, 3) == 3
    assert conv_output_size(5, 3, stride=1, padding=0) == 3
    assert conv_output_size((5, 5), (3, 3)) == (3, 3)


def _random_pool_configs(count, n):
    """Seeded configurations with a padding PyTorch's max_pool accepts (p <= k // 2)."""
    rng = np.random.default_rng(_RNG_SEED + n)
    configs = []
    for _ in range(count):
        k = tuple(int(v) for v in rng.integers(1, 6, n))
        s = tuple(int(v) for v in rng.integers(1, 5, n))
        d = tuple(int(v) for v in rng.integers(1, 4, n))
        p = tuple(int(rng.integers(0, ki // 2 + 1)) for ki in k)
        size = tuple(int(v) for v in rng.integers(1, 16, n))
        configs.append((size, k, s, p, d, bool(rng.integers(0, 2))))
    return configs


@pytest.mark.parametrize("n", [1, 2])
def test_conv_output_size_matches_torch_pooling(n):
    pool = F.max_pool1d if n == 1 else F.max_pool2d
    rejected = accepted = 0
    for size, k, s, p, d, ceil in _random_pool_configs(200, n):
        try:
            expected = tuple(pool(torch.zeros((1, 1, *size)), k, s, p, d, ceil).shape[2:])
        except RuntimeError:  # PyTorch: output too small; jaxconv raises before any array op
            rejected += 1
            with pytest.raises(ValueError, match=r"^conv_output_size: .*window"):
                conv_output_size(size, k, stride=s, padding=p, dilation=d, ceil_mode=ceil)
            continue
        accepted += 1
        got = conv_output_size(size, k, stride=s, padding=p, dilation=d, ceil_mode=ceil)
        assert got == expected, (size, k, s, p, d, ceil)
        pairs = tuple((pi, pi) for pi in p)
        assert conv_output_size(size, k, s, pairs, d, ceil) == expected
        if n == 1:  # scalars in, int out
            assert conv_output_size(size[0], k[0], s[0], p[0], d[0], ceil) == expected[0]
    assert accepted > 100 and rejected > 5  # both outcomes are exercised


def test_ceil_mode_window_longer_than_padded_input():
    # PyTorch keeps one output when, in ceil mode, the only window starts inside the input
    x = torch.zeros((1, 1, 2))
    assert F.max_pool1d(x, 3, 2, ceil_mode=True).shape[-1] == 1
    assert conv_output_size(2, 3, stride=2, ceil_mode=True) == 1
    with pytest.raises(ValueError, match="window"):
        conv_output_size(2, 3, stride=2)


def test_ceil_mode_last_window_rule():
    # PyTorch drops a last window that would start in the right padding only.
    x = torch.zeros((1, 1, 5))
    for k, s, p in [(2, 2, 1), (3, 2, 1), (2, 3, 1), (3, 3, 0)]:
        expected = F.max_pool1d(x, k, s, p, ceil_mode=True).shape[-1]
        assert conv_output_size(5, k, s, p, ceil_mode=True) == expected


def _random_transpose_configs(count, n):
    rng = np.random.default_rng(_RNG_SEED - n)
    configs = []
    while len(configs) < count:
        k = tuple(int(v) for v in rng.integers(1, 5, n))
        s = tuple(int(v) for v in rng.integers(1, 4, n))
        d = tuple(int(v) for v in rng.integers(1, 3, n))
        p = tuple(int(v) for v in rng.integers(0, 3, n))
        op = tuple(int(rng.integers(0, max(si, di))) for si, di in zip(s, d, strict=True))
        size = tuple(int(v) for v in rng.integers(1, 8, n))
        outs = [
            (i - 1) * si - 2 * pi + di * (ki - 1) + oi + 1
            for i, si, pi, di, ki, oi in zip(size, s, p, d, k, op, strict=True)
        ]
        if min(outs) >= 1:
            configs.append((size, k, s, p, op, d))
    return configs


@pytest.mark.parametrize("n", [1, 2, 3])
def test_conv_transpose_output_size_matches_torch(n):
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    for size, k, s, p, op, d in _random_transpose_configs(40, n):
        y = torch.zeros((1, 1, *size))
        w = torch.zeros((1, 1, *k))
        expected = tuple(fn(y, w, stride=s, padding=p, output_padding=op, dilation=d).shape[2:])
        assert conv_transpose_output_size(size, k, s, p, op, d) == expected
        # the transposed size is an input size whose convolution has `size` outputs
        if all(o < si for o, si in zip(op, s, strict=True)):
            assert conv_output_size(expected, k, s, p, d) == size


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_string_paddings():
    # VALID = no padding; SAME keeps ceil(I/S); FULL pads d*(k-1) on both sides
    assert conv_output_size(7, 3, padding="VALID") == 5
    assert conv_output_size(7, 3, padding="valid") == 5
    assert conv_output_size((7, 8), (3, 4), stride=(1, 3), padding="SAME") == (7, 3)
    assert conv_output_size(10, 3, stride=2, dilation=2, padding="SAME") == 5
    assert conv_output_size(5, 3, padding="FULL") == 7
    assert conv_output_size(5, 3, dilation=2, padding="FULL") == 9
    x = torch.zeros((1, 1, 9))
    w = torch.zeros((1, 1, 4))
    for d in (1, 2):
        same = F.conv1d(x, w, padding="same", dilation=d).shape[-1]
        assert conv_output_size(9, 4, dilation=d, padding="SAME") == same
    assert conv_transpose_output_size(5, 3, padding="VALID") == 7


@pytest.mark.parametrize("padding", ["SAME", "FULL", "VALID", "same", 1, ((2, 0),)])
def test_conv_transpose_output_size_is_conv_transposes_shape(padding):
    """The helper predicts :func:`jaxconv.conv_transpose`'s output for every padding it takes."""
    for size, k, s, d in [(16, 3, 2, 1), (7, 4, 3, 2), (5, 1, 1, 1), (9, 5, 1, 3)]:
        w, y = jnp.ones((k, 1, 1)), jnp.ones((1, size, 1))
        try:
            want = jaxconv.conv_transpose(y, w, stride=s, padding=padding, dilation=d).shape[1:2]
        except ValueError:  # e.g. "FULL" padding past the output: the helper must raise too
            with pytest.raises(ValueError, match="conv_transpose_output_size: "):
                conv_transpose_output_size((size,), k, s, padding, dilation=d)
            continue
        assert conv_transpose_output_size((size,), k, s, padding, dilation=d) == want


def test_asymmetric_pairs():
    assert conv_output_size(5, 3, padding=((1, 0),)) == (4,)
    assert conv_output_size((5, 6), 3, padding=((0, 2), (1, 1))) == (5, 6)
    assert conv_output_size(5, 2, stride=2, padding=((0, 1),), ceil_mode=True) == (3,)
    assert conv_transpose_output_size((4,), 3, padding=((1, 0),)) == (5,)


_ERRORS = [
    (dict(size=5, kernel=0), ValueError, "kernel"),
    (dict(size=5, kernel=-1), ValueError, "kernel"),
    (dict(size=5, kernel=3, stride=0), ValueError, "stride"),
    (dict(size=5, kernel=3, dilation=0), ValueError, "dilation"),
    (dict(size=0, kernel=1), ValueError, "size"),
    (dict(size=5, kernel=3, padding=-1), ValueError, "padding"),
    (dict(size=(5,), kernel=3, padding=((1, -1),)), ValueError, "padding"),
    (dict(size=2, kernel=3), ValueError, "window"),
    (dict(size=5, kernel=3, dilation=3), ValueError, "window"),
    (dict(size=(5, 5), kernel=(3, 3, 3)), ValueError, "kernel"),
    (dict(size=(5, 5), kernel=3, stride=(1,)), ValueError, "stride"),
    (dict(size=(5, 5), kernel=3, padding=((1, 1),)), ValueError, "padding"),
    (dict(size=5, kernel=True), TypeError, "kernel"),
    (dict(size=5.0, kernel=3), TypeError, "size"),
    (dict(size=5, kernel=3, stride=1.5), TypeError, "stride"),
    (dict(size=5, kernel="3"), TypeError, "kernel"),
    (dict(size=5, kernel=3, padding=1.0), TypeError, "padding"),
    (dict(size=5, kernel=3, padding="HALF"), ValueError, "padding"),
    (dict(size=(5, 5), kernel=(3, True)), TypeError, "kernel"),
]


@pytest.mark.parametrize(("kwargs", "error", "name"), _ERRORS)
def test_conv_output_size_errors(kwargs, error, name):
    with pytest.raises(error, match=rf"conv_output_size: .*{name}"):
        conv_output_size(**kwargs)


_TRANSPOSE_ERRORS = [
    (dict(size=3, kernel=3, stride=2, output_padding=2), ValueError, "output_padding"),
    (dict(size=3, kernel=3, output_padding=1), ValueError, "output_padding"),
    (dict(size=3, kernel=3, output_padding=-1), ValueError, "output_padding"),
    (dict(size=1, kernel=1, padding=1), ValueError, "padding"),
    (dict(size=3, kernel=3, padding="HALF"), ValueError, "padding"),
    (dict(size=3, kernel=3, stride=2, padding="SAME", output_padding=1), ValueError, "output_pad"),
    (dict(size=3, kernel=0), ValueError, "kernel"),
    (dict(size=(3, 3), kernel=(3,)), ValueError, "kernel"),
    (dict(size=3, kernel=3, stride=False), TypeError, "stride"),
]


@pytest.mark.parametrize(("kwargs", "error", "name"), _TRANSPOSE_ERRORS)
def test_conv_transpose_output_size_errors(kwargs, error, name):
    with pytest.raises(error, match=rf"conv_transpose_output_size: .*{name}"):
        conv_transpose_output_size(**kwargs)

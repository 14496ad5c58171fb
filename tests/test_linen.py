"""jaxconv.linen modules: parameters and initialisers against flax.linen, outputs against PyTorch.

Every module runs under ``jax.jit``. The pooling modules hold no parameters (except a learnable
``p``) and must give PyTorch's answer for one configuration each, in both layouts.
"""

import zlib

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from jaxprs import primitives

import jaxconv
from jaxconv import linen as jcl

CL, CF = "channels_last", "channels_first"


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _input(shape, data_format, *key, positive=False):
    """A float32 NHWC input and its NCHW copy for PyTorch; the module gets ``data_format``'s."""
    nhwc = _rng(*key).standard_normal(shape).astype(np.float32)
    if positive:
        nhwc = np.abs(nhwc)
    nchw = np.moveaxis(nhwc, -1, 1)
    return jnp.asarray(nhwc if data_format == CL else nchw), torch.tensor(nchw)


def _as_nchw(y, data_format):
    y = np.asarray(y)
    return np.moveaxis(y, -1, 1) if data_format == CL else y


def _torch_weight(kernel, data_format):
    """The module's kernel in PyTorch's layout (O, I, kH, kW) / ConvTranspose (I, O, kH, kW)."""
    kernel = np.asarray(kernel)
    return torch.tensor(kernel.transpose(3, 2, 0, 1) if data_format == CL else kernel)


@pytest.mark.parametrize("data_format", [CL, CF])
def test_conv_matches_torch(data_format):
    x, tx = _input((2, 9, 7, 4), data_format, "conv")
    layer = jcl.Conv(6, (3, 2), stride=2, padding=1, groups=2, data_format=data_format)
    variables = jax.jit(layer.init)(jax.random.key(0), x)
    kernel = variables["params"]["kernel"]
    chex.assert_shape(kernel, (3, 2, 2, 6) if data_format == CL else (6, 2, 3, 2))
    bias = jnp.asarray(_rng("bias").standard_normal(6), jnp.float32)
    variables = {"params": {"kernel": kernel, "bias": bias}}
    out = jax.jit(layer.apply)(variables, x)
    chex.assert_shape(out, (2, 5, 4, 6) if data_format == CL else (2, 6, 5, 4))
    want = F.conv2d(
        tx, _torch_weight(kernel, data_format), torch.tensor(np.asarray(bias)), 2, 1, groups=2
    )
    np.testing.assert_allclose(_as_nchw(out, data_format), want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("data_format", [CL, CF])
def test_conv_transpose_matches_torch(data_format):
    x, tx = _input((2, 5, 4, 4), data_format, "conv_transpose")
    layer = jcl.ConvTranspose(
        6, (3, 3), stride=2, padding=1, output_padding=1, groups=2, data_format=data_format
    )
    variables = jax.jit(layer.init)(jax.random.key(1), x)
    kernel = variables["params"]["kernel"]
    chex.assert_shape(kernel, (3, 3, 3, 4) if data_format == CL else (4, 3, 3, 3))
    out = jax.jit(layer.apply)(variables, x)
    chex.assert_shape(out, (2, 10, 8, 6) if data_format == CL else (2, 6, 10, 8))
    want = F.conv_transpose2d(
        tx, _torch_weight(kernel, data_format), None, 2, 1, output_padding=1, groups=2
    )
    np.testing.assert_allclose(_as_nchw(out, data_format), want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [jcl.Conv, jcl.ConvTranspose])
def test_conv_modules_pass_precision_on(layer):
    module = layer(features=3, kernel_size=(3, 3), precision="highest")
    x = jnp.ones((1, 5, 5, 2), jnp.float32)
    params = module.init(jax.random.key(0), x)
    convs = primitives(jax.make_jaxpr(module.apply)(params, x), "conv_general_dilated")
    assert [[p.name for p in e.params["precision"]] for e in convs] == [["HIGHEST", "HIGHEST"]]


def test_conv_initialisers_are_flax_defaults():
    """Same key, same shape: the kernel is exactly flax.linen.Conv's; the bias is zero."""
    x = jnp.ones((2, 8, 8, 3), jnp.float32)
    ours = jcl.Conv(5, (3, 3), padding="SAME").init(jax.random.key(3), x)
    flax_ = nn.Conv(5, (3, 3), padding="SAME").init(jax.random.key(3), x)
    chex.assert_trees_all_equal(ours, flax_)
    assert not np.any(np.asarray(ours["params"]["bias"]))
    np.testing.assert_allclose(
        jcl.Conv(5, (3, 3), padding="SAME").apply(ours, x),
        nn.Conv(5, (3, 3), padding="SAME").apply(flax_, x),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("layer", "in_features", "fan_in"),
    [
        (jcl.Conv(64, (3, 3), data_format=CF), 32, 9 * 32),
        (jcl.ConvTranspose(64, (3, 3)), 32, 9 * 32),
        (jcl.ConvTranspose(32, (3, 3), data_format=CF), 64, 9 * 64),
        (jcl.Conv(64, (3, 3), groups=4), 32, 9 * 8),
        (jcl.ConvTranspose(64, (3, 3), groups=4), 32, 9 * 8),  # each output reads 32/4 inputs
        (jcl.ConvTranspose(128, (3, 3), groups=16, data_format=CF), 64, 9 * 4),
    ],
)
def test_default_kernel_init_is_lecun_normal_over_the_input_features(layer, in_features, fan_in):
    shape = (1, 6, 6, in_features) if layer.data_format == CL else (1, in_features, 6, 6)
    params = layer.init(jax.random.key(4), jnp.ones(shape, jnp.float32))["params"]
    kernel = np.asarray(params["kernel"])
    np.testing.assert_allclose(kernel.std(), 1 / np.sqrt(fan_in), rtol=0.03)
    assert abs(kernel.mean()) < 3 / np.sqrt(fan_in * kernel.size)


@pytest.mark.parametrize("layer", [jcl.Conv, jcl.ConvTranspose])
def test_kernel_init_gets_the_channels_last_shape(layer):
    """A Flax initialiser keeps its variance in channels_first (he_normal over axis -2 of the
    channels_last shape, 9 * 32 here) and the kernel is the channels_last one, transposed."""
    init = nn.initializers.he_normal()
    x = jnp.ones((1, 6, 6, 32), jnp.float32)
    last = layer(32, (3, 3), kernel_init=init).init(jax.random.key(2), x)["params"]["kernel"]
    first = layer(32, (3, 3), kernel_init=init, data_format=CF)
    kernel = first.init(jax.random.key(2), jnp.moveaxis(x, -1, 1))["params"]["kernel"]
    np.testing.assert_array_equal(kernel, np.transpose(last, (3, 2, 0, 1)))
    np.testing.assert_allclose(np.std(kernel), np.sqrt(2 / (9 * 32)), rtol=0.03)


def test_conv_dtypes():
    x = jnp.ones((1, 6, 6, 2), jnp.float32)
    layer = jcl.Conv(3, (3, 3), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    variables = layer.init(jax.random.key(0), x)
    chex.assert_trees_all_equal_dtypes(variables, {"params": {"kernel": x, "bias": x}})
    chex.assert_type(jax.jit(layer.apply)(variables, x), jnp.bfloat16)
    layer = jcl.Conv(3, (3, 3), param_dtype=jnp.float64, use_bias=False)
    variables = layer.init(jax.random.key(0), x.astype(jnp.float64))
    assert set(variables["params"]) == {"kernel"}
    chex.assert_type(layer.apply(variables, x.astype(jnp.float64)), jnp.float64)


@pytest.mark.parametrize(
    ("layer", "shape", "error", "words"),
    [
        (jcl.Conv(4, 3), (1, 6, 6, 2), TypeError, ["jaxconv.linen.Conv", "kernel_size", "3"]),
        (jcl.Conv(4, (3, 3), groups=3), (1, 6, 6, 2), ValueError, ["groups", "3"]),
        (jcl.ConvTranspose(4, (3, 3)), (6, 2), ValueError, ["ConvTranspose", "`x`", "2 axes"]),
        (jcl.Conv(4, (3, 3), data_format="NHWC"), (1, 6, 6, 2), ValueError, ["data_format"]),
        (jcl.Conv(0, (3, 3)), (1, 6, 6, 2), ValueError, ["jaxconv.linen.Conv", "`features`", "0"]),
        (jcl.Conv(4, (3, 3)), (1, 6, 6, 0), ValueError, ["Conv", "channel count of `x`", "0"]),
        (jcl.ConvTranspose(4, (3, 3), groups=3), (1, 6, 6, 6), ValueError, ["`features` (4)"]),
        (jcl.Conv(4, (3, 3), use_bias="no"), (1, 6, 6, 2), TypeError, ["Conv", "`use_bias`"]),
        (jcl.Conv(4, (3, 3), param_dtype=jnp.int32), (1, 6, 6, 2), TypeError, ["`param_dtype`"]),
        (jcl.ConvTranspose(4, (3, 3), dtype="foo"), (1, 6, 6, 2), TypeError, ["`dtype`", "foo"]),
        (jcl.LPPool(2.0, (2, 2), learnable_p="yes"), (1, 6, 6, 2), TypeError, ["`learnable_p`"]),
        (
            jcl.LPPool(2.0, (2, 2), learnable_p=True, param_dtype=jnp.int32),
            (1, 6, 6, 2),
            TypeError,
            ["jaxconv.linen.LPPool", "`param_dtype`"],
        ),
        (
            jcl.FractionalMaxPool((2, 2), (3, 3), deterministic=False, rng_collection=3),
            (1, 6, 6, 2),
            TypeError,
            ["3"],
        ),
    ],
)
def test_conv_bad_configuration_is_named(layer, shape, error, words):
    with pytest.raises(error) as info:
        layer.init(jax.random.key(0), jnp.ones(shape, jnp.float32))
    for word in words:
        assert word in str(info.value)


# One configuration per pooling module: (module, PyTorch NCHW reference, positive input).
POOLS = {
    "max": (
        lambda df: jcl.MaxPool((3, 2), (2, 1), 1, dilation=(1, 2), ceil_mode=True, data_format=df),
        lambda t: F.max_pool2d(t, (3, 2), (2, 1), 1, dilation=(1, 2), ceil_mode=True),
        False,
    ),
    "avg": (
        lambda df: jcl.AvgPool((3, 3), 2, 1, count_include_pad=False, data_format=df),
        lambda t: F.avg_pool2d(t, 3, 2, 1, count_include_pad=False),
        False,
    ),
    "lp": (
        lambda df: jcl.LPPool(3.0, (2, 3), (1, 2), data_format=df),
        lambda t: F.lp_pool2d(t, 3.0, (2, 3), (1, 2)),
        True,
    ),
    "adaptive_avg": (
        lambda df: jcl.AdaptiveAvgPool((3, 5), data_format=df),
        lambda t: F.adaptive_avg_pool2d(t, (3, 5)),
        False,
    ),
    "adaptive_max": (
        lambda df: jcl.AdaptiveMaxPool((4, None), data_format=df),
        lambda t: F.adaptive_max_pool2d(t, (4, 7)),
        False,
    ),
}


@pytest.mark.parametrize(
    ("name", "data_format"), [(name, (CF, CL)[i % 2]) for i, name in enumerate(POOLS)]
)
def test_pooling_modules_match_torch(name, data_format):
    make, reference, positive = POOLS[name]
    layer = make(data_format)
    x, tx = _input((2, 9, 7, 3), data_format, name, positive=positive)
    variables = layer.init(jax.random.key(0), x)
    assert not jax.tree.leaves(variables)
    out = jax.jit(layer.apply)(variables, x)
    want = reference(tx).numpy()
    chex.assert_shape(out, np.moveaxis(want, 1, -1).shape if data_format == CL else want.shape)
    np.testing.assert_allclose(_as_nchw(out, data_format), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("layer", "reference"),
    [
        (
            jcl.MaxPool((2, 2), return_indices=True),
            lambda t: F.max_pool2d(t, 2, 2, 0, 1, False, True),
        ),
        (
            jcl.AdaptiveMaxPool((3, 3), return_indices=True),
            lambda t: F.adaptive_max_pool2d(t, 3, True),
        ),
    ],
)
def test_return_indices(layer, reference):
    x, tx = _input((2, 8, 7, 3), CL, "indices")
    out, indices = jax.jit(layer.apply)({}, x)
    want, want_indices = reference(tx)
    np.testing.assert_allclose(_as_nchw(out, CL), want.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(_as_nchw(indices, CL), want_indices.numpy())


def _lp_step(layer, optimizer):
    def loss(params, x):
        return -jnp.sum(layer.apply({"params": params}, x))

    @jax.jit
    def step(params, state, x):
        grads = jax.grad(loss)(params, x)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 step counts and floats
            updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state

    return step


def test_learnable_p_starts_at_p_and_stays_at_least_one():
    x, _ = _input((2, 6, 6, 3), CL, "learnable", positive=True)
    layer = jcl.LPPool(2.5, (2, 2), learnable_p=True)
    params = layer.init(jax.random.key(0), x)["params"]
    chex.assert_shape(params["p_raw"], ())
    chex.assert_type(params["p_raw"], jnp.float32)
    np.testing.assert_allclose(jcl.learned_p(params["p_raw"]), 2.5, rtol=1e-6)
    np.testing.assert_allclose(
        layer.apply({"params": params}, x), jaxconv.lp_pool(x, 2.5, (2, 2)), rtol=1e-5
    )
    # For x >= 0 the p-norm falls as p grows, so maximising the output drives p down towards 1.
    optimizer = optax.adam(1.0)
    state, step = optimizer.init(params), _lp_step(layer, optimizer)
    seen = []
    for _ in range(60):
        params, state = step(params, state, x)
        seen.append(float(jcl.learned_p(params["p_raw"])))
    assert min(seen) >= 1.0
    assert seen[-1] < 1.01
    assert np.isfinite(np.asarray(layer.apply({"params": params}, x))).all()


def test_learnable_p_must_start_finite():
    with pytest.raises(ValueError, match=r"jaxconv.linen.LPPool.*`p`.*inf"):
        jcl.LPPool(float("inf"), (2, 2), learnable_p=True).init(
            jax.random.key(0), jnp.ones((1, 4, 4, 1), jnp.float32)
        )


def test_learnable_p_must_fit_the_param_dtype():
    """``p_raw`` is about ``p - 1``: beyond float16's 65504 it would start at inf (so p = inf)."""
    x = jnp.ones((1, 4, 4, 1), jnp.float16)
    layer = jcl.LPPool(1e5, (2, 2), learnable_p=True, param_dtype=jnp.float16)
    with pytest.raises(ValueError, match=r"jaxconv.linen.LPPool.*`p`.*100000.*float16.*65504"):
        layer.init(jax.random.key(0), x)
    layer = jcl.LPPool(6e4, (2, 2), learnable_p=True, param_dtype=jnp.float16)
    p_raw = layer.init(jax.random.key(0), x)["params"]["p_raw"]
    assert jnp.isfinite(p_raw) and 59000 < float(1 + jax.nn.softplus(p_raw)) < 61000


def _fractional_check(x, out, indices):
    """Every output is the input value at its index (one (batch, channel) plane at a time)."""
    n, h, w, c = x.shape
    planes = np.moveaxis(np.asarray(x), -1, 1).reshape(n, c, h * w)
    picked = np.take_along_axis(
        planes, np.moveaxis(np.asarray(indices), -1, 1).reshape(n, c, -1), -1
    )
    np.testing.assert_array_equal(picked, np.moveaxis(np.asarray(out), -1, 1).reshape(n, c, -1))


def test_fractional_rng_stream_and_deterministic_flag():
    x, _ = _input((2, 9, 9, 3), CL, "fractional")
    layer = jcl.FractionalMaxPool((2, 2), output_size=(5, 5), return_indices=True)
    apply = jax.jit(layer.apply, static_argnames="deterministic")
    assert not jax.tree.leaves(layer.init(jax.random.key(0), x, deterministic=True))
    draws = [
        apply({}, x, deterministic=False, rngs={"fractional": jax.random.key(k)}) for k in (0, 0, 1)
    ]
    for out, indices in draws:
        chex.assert_shape((out, indices), (2, 5, 5, 3))
        _fractional_check(x, out, indices)
    np.testing.assert_array_equal(draws[0][1], draws[1][1])
    assert np.any(np.asarray(draws[0][1]) != np.asarray(draws[2][1]))
    fixed = apply({}, x, deterministic=True)
    samples = jnp.full((2, 3, 2), 0.5, jnp.float32)
    want = jaxconv.fractional_max_pool(
        x, (2, 2), output_size=(5, 5), samples=samples, return_indices=True
    )
    chex.assert_trees_all_equal(fixed, want)
    with pytest.raises(flax.errors.InvalidRngError, match="fractional"):
        layer.apply({}, x, deterministic=False)
    with pytest.raises(TypeError, match=r"jaxconv.linen.FractionalMaxPool: `deterministic`"):
        layer.apply({}, x, deterministic="yes")


def test_fractional_rng_collection_name_and_constructor_flag():
    x, _ = _input((1, 8, 8, 2), CF, "fractional-cf")
    layer = jcl.FractionalMaxPool(
        (3, 3), output_ratio=0.75, data_format=CF, deterministic=False, rng_collection="pool"
    )
    out = jax.jit(layer.apply)({}, x, rngs={"pool": jax.random.key(2)})
    chex.assert_shape(out, (1, 2, 6, 6))
    chex.assert_tree_all_finite(out)

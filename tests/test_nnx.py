"""jaxconv.nnx modules: initialisers against flax.nnx, outputs against PyTorch, state and rngs.

Each module is run under ``nnx.jit``.
"""

import re
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from jaxprs import primitives

import jaxconv
from jaxconv import nnx as jcn

CL, CF = "channels_last", "channels_first"


def _x(shape, *key, positive=False):
    x = _rng(*key).standard_normal(shape).astype(np.float32)
    return jnp.asarray(np.abs(x) if positive else x)


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


@nnx.jit
def _call(module, x):
    return module(x)


def test_conv_initialisers_and_output_match_flax_nnx():
    x = _x((2, 8, 8, 3), "conv")
    ours = jcn.Conv(3, 5, (3, 3), padding="SAME", rngs=nnx.Rngs(7))
    theirs = nnx.Conv(3, 5, (3, 3), padding="SAME", rngs=nnx.Rngs(7))
    chex.assert_trees_all_equal(nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param))
    assert not np.any(np.asarray(ours.bias[...]))
    np.testing.assert_allclose(_call(ours, x), theirs(x), rtol=1e-5, atol=1e-5)


def test_conv_channels_first_matches_torch():
    x = _x((2, 4, 9, 7), "conv-cf")
    layer = jcn.Conv(4, 6, (3, 2), 2, 1, 1, 2, data_format=CF, rngs=nnx.Rngs(0))
    chex.assert_shape(layer.kernel[...], (6, 2, 3, 2))
    layer.bias[...] = jnp.asarray(_rng("bias").standard_normal(6), jnp.float32)
    out = _call(layer, x)
    w, b = (torch.tensor(np.asarray(v[...])) for v in (layer.kernel, layer.bias))
    want = F.conv2d(torch.tensor(np.asarray(x)), w, b, 2, 1, groups=2)
    chex.assert_shape(out, tuple(want.shape))
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-5, atol=1e-5)


def test_conv_transpose_matches_torch():
    x = _x((2, 5, 4, 4), "convT")
    layer = jcn.ConvTranspose(4, 6, (3, 3), 2, 1, 1, groups=2, use_bias=False, rngs=nnx.Rngs(1))
    chex.assert_shape(layer.kernel[...], (3, 3, 3, 4))
    assert layer.bias is None
    out = _call(layer, x)
    w = torch.tensor(np.asarray(layer.kernel[...]).transpose(3, 2, 0, 1))
    tx = torch.tensor(np.moveaxis(np.asarray(x), -1, 1))
    want = F.conv_transpose2d(tx, w, None, 2, 1, output_padding=1, groups=2).numpy()
    np.testing.assert_allclose(np.moveaxis(np.asarray(out), -1, 1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [jcn.Conv, jcn.ConvTranspose])
def test_conv_modules_pass_precision_on(layer):
    module = layer(2, 3, (3, 3), precision="highest", rngs=nnx.Rngs(0))
    x = jnp.ones((1, 5, 5, 2), jnp.float32)
    convs = primitives(jax.make_jaxpr(module)(x), "conv_general_dilated")
    assert [[p.name for p in e.params["precision"]] for e in convs] == [["HIGHEST", "HIGHEST"]]


def test_conv_has_flax_nnx_conv_attributes():
    """Code that inspects flax.nnx.Conv layers finds the same attributes here."""
    for layer in (
        jcn.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)),
        jcn.ConvTranspose(3, 8, (3, 3), use_bias=False, rngs=nnx.Rngs(0)),
    ):
        theirs = nnx.Conv(3, 8, (3, 3), use_bias=layer.use_bias, rngs=nnx.Rngs(0))
        for name in ("in_features", "out_features", "kernel_size", "use_bias", "param_dtype"):
            assert getattr(layer, name) == getattr(theirs, name), name
        assert layer.dtype is None and callable(layer.kernel_init) and callable(layer.bias_init)


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_grouped_conv_transpose_init_keeps_the_variance(groups):
    """The default fan-in is what each output reads: ``9 * C_in // groups``, as Conv's."""
    layer = jcn.ConvTranspose(64, 64, (3, 3), groups=groups, rngs=nnx.Rngs(0))
    std = float(np.std(np.asarray(layer.kernel[...])))
    np.testing.assert_allclose(std, np.sqrt(groups / (9 * 64)), rtol=0.05)


@pytest.mark.parametrize("layer", [jcn.Conv, jcn.ConvTranspose])
def test_channels_first_kernel_is_the_channels_last_one_transposed(layer):
    """Initialisers are called with the channels_last shape, Flax's layout: a Flax initialiser
    keeps its variance in channels_first (he_normal's fan-in is axis -2 of the channels_last
    shape: the input channels of Conv, of ConvTranspose those of the convolution it is the
    adjoint of), and the default kernel is the channels_last one, transposed."""
    he_fan_in = 9 * 64 if layer is jcn.Conv else 9 * 128
    inits = ((None, 1 / np.sqrt(9 * 64)), (nnx.initializers.he_normal(), np.sqrt(2 / he_fan_in)))
    for init, std in inits:
        last = layer(64, 128, (3, 3), kernel_init=init, rngs=nnx.Rngs(5))
        first = layer(64, 128, (3, 3), kernel_init=init, data_format=CF, rngs=nnx.Rngs(5))
        kernel = np.asarray(first.kernel[...])
        np.testing.assert_array_equal(kernel, np.transpose(last.kernel[...], (3, 2, 0, 1)))
        np.testing.assert_allclose(kernel.std(), std, rtol=0.03)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: jcn.Conv(3, 4, (3, 3), use_bias="no", rngs=nnx.Rngs(0)), "`use_bias`"),
        (lambda: jcn.Conv(3, 4, (3, 3), param_dtype=jnp.int32, rngs=nnx.Rngs(0)), "param_dtype"),
        (lambda: jcn.Conv(3, 4, (3, 3), dtype="foo", rngs=nnx.Rngs(0)), "`dtype`"),
        (lambda: jcn.LPPool(2.0, (2, 2), learnable_p="yes"), "`learnable_p`"),
        (lambda: jcn.LPPool(2.0, (2, 2), learnable_p=True, param_dtype=int), "`param_dtype`"),
        (lambda: jcn.FractionalMaxPool((2, 2), output_size=3, rng_collection=3), "collection"),
    ],
)
def test_bad_module_options_are_named(make, words):
    with pytest.raises(TypeError, match=rf"^jaxconv\.nnx\.\w+: .*{words}"):
        make()


def test_learnable_p_must_fit_the_param_dtype():
    with pytest.raises(ValueError, match=r"^jaxconv\.nnx\.LPPool: .*`p`.*float16"):
        jcn.LPPool(1e5, (2, 2), learnable_p=True, param_dtype=jnp.float16)
    p = jcn.LPPool(1e5, (2, 2), learnable_p=True, param_dtype=jnp.float32).p_value
    np.testing.assert_allclose(p, 1e5, rtol=1e-6)


def test_conv_bad_kernel_size_is_named():
    with pytest.raises(TypeError, match=r"jaxconv.nnx.Conv.*kernel_size"):
        jcn.Conv(3, 4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"jaxconv.nnx.ConvTranspose.*groups"):
        jcn.ConvTranspose(3, 4, (3, 3), groups=2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    ("rngs", "error", "words"),
    [
        (None, TypeError, "`rngs` must be an nnx.Rngs"),
        (jax.random.key(0), TypeError, "got PRNGKeyArray"),
        (nnx.Rngs(other=0), ValueError, "`rngs` must have a `params` stream"),
    ],
)
def test_conv_bad_rngs_are_named(rngs, error, words):
    with pytest.raises(error, match=rf"jaxconv.nnx.Conv: .*{re.escape(words)}"):
        jcn.Conv(4, 2, (3, 3), rngs=rngs)


# (module, the function call it must equal) for every pooling module.
POOLS = {
    "max": (
        lambda: jcn.MaxPool((3, 2), (2, 1), 1, dilation=(1, 2), ceil_mode=True),
        lambda x: jaxconv.max_pool(x, (3, 2), (2, 1), 1, dilation=(1, 2), ceil_mode=True),
    ),
    "avg": (
        lambda: jcn.AvgPool((3, 3), 2, 1, count_include_pad=False, data_format=CF),
        lambda x: jaxconv.avg_pool(x, (3, 3), 2, 1, count_include_pad=False, data_format=CF),
    ),
    "lp": (
        lambda: jcn.LPPool(3.0, (2, 3), (1, 2)),
        lambda x: jaxconv.lp_pool(x, 3.0, (2, 3), (1, 2)),
    ),
    "adaptive_avg": (
        lambda: jcn.AdaptiveAvgPool((3, 5)),
        lambda x: jaxconv.adaptive_avg_pool(x, (3, 5)),
    ),
    "adaptive_max": (
        lambda: jcn.AdaptiveMaxPool((4, None), return_indices=True),
        lambda x: jaxconv.adaptive_max_pool(x, (4, None), return_indices=True),
    ),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_pooling_modules_call_their_function(name):
    make, function = POOLS[name]
    layer = make()
    assert not jax.tree.leaves(nnx.state(layer))
    x = _x((2, 9, 7, 3), name)
    # both compiled: eager op-by-op rounding may differ from a fused program's on a GPU
    chex.assert_trees_all_close(_call(layer, x), jax.jit(function)(x), rtol=1e-6, atol=1e-7)


def test_max_pool_module_matches_torch():
    x = _x((2, 9, 7, 3), "max-torch")
    out = _call(jcn.MaxPool((3, 3), 2, 1), x)
    want = F.max_pool2d(torch.tensor(np.moveaxis(np.asarray(x), -1, 1)), 3, 2, 1).numpy()
    np.testing.assert_allclose(np.moveaxis(np.asarray(out), -1, 1), want, rtol=1e-6)


def test_learnable_p_is_a_param_that_stays_at_least_one():
    x = _x((2, 6, 6, 3), "learnable", positive=True)
    layer = jcn.LPPool(2.5, (2, 2), learnable_p=True)
    params = nnx.state(layer, nnx.Param)
    chex.assert_shape(layer.p_raw[...], ())
    assert len(jax.tree.leaves(params)) == 1
    np.testing.assert_allclose(layer.p_value, 2.5, rtol=1e-6)
    np.testing.assert_allclose(_call(layer, x), jaxconv.lp_pool(x, 2.5, (2, 2)), rtol=1e-5)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 step counts and floats
        optimizer = nnx.Optimizer(layer, optax.adam(1.0), wrt=nnx.Param)

    @nnx.jit
    def step(layer, optimizer, x):
        # For x >= 0 the p-norm falls as p grows: maximising the output pushes p towards 1.
        grads = nnx.grad(lambda m: -jnp.sum(m(x)))(layer)
        with jax.numpy_dtype_promotion("standard"):
            optimizer.update(layer, grads)

    seen = []
    for _ in range(60):
        step(layer, optimizer, x)
        seen.append(float(layer.p_value))
    assert min(seen) >= 1.0
    assert seen[-1] < 1.01


def test_fixed_p_has_no_parameters():
    layer = jcn.LPPool(2.0, (2, 2))
    assert layer.p_value == 2.0
    assert not jax.tree.leaves(nnx.state(layer, nnx.Param))


def _fractional(**kw):
    return jcn.FractionalMaxPool((2, 2), output_size=(5, 5), return_indices=True, **kw)


def test_fractional_keeps_a_stream_and_advances_it():
    x = _x((2, 9, 9, 3), "fractional")
    a, b = _fractional(rngs=nnx.Rngs(fractional=3)), _fractional(rngs=nnx.Rngs(fractional=3))
    first, again = _call(a, x), _call(b, x)
    chex.assert_trees_all_equal(first, again)
    chex.assert_shape(first, (2, 5, 5, 3))
    second = _call(a, x)
    assert np.any(np.asarray(first[1]) != np.asarray(second[1]))
    given = a(x, rngs=jax.random.key(5))
    chex.assert_trees_all_equal(
        given,
        jaxconv.fractional_max_pool(
            x, (2, 2), output_size=(5, 5), key=jax.random.key(5), return_indices=True
        ),
    )


def test_fractional_eval_mode_is_deterministic_and_needs_no_rngs():
    x = _x((1, 2, 8, 8), "fractional-eval")
    layer = jcn.FractionalMaxPool((3, 3), output_ratio=0.75, data_format=CF)
    with pytest.raises(ValueError, match=r"jaxconv.nnx.FractionalMaxPool.*rngs"):
        layer(x)
    with pytest.raises(ValueError, match=r"FractionalMaxPool: `rngs` must have a `fractional`"):
        layer(x, rngs=nnx.Rngs(params=0))
    with pytest.raises(TypeError, match=r"jaxconv.nnx.FractionalMaxPool: `deterministic`"):
        layer(x, deterministic=1)
    with pytest.raises(TypeError, match=r"jaxconv.nnx.FractionalMaxPool: `deterministic`"):
        jcn.FractionalMaxPool((3, 3), output_ratio=0.75, deterministic="yes")
    model = nnx.Sequential(layer)
    model.eval()
    out = _call(model, x)
    samples = jnp.full((1, 2, 2), 0.5, jnp.float32)
    want = jaxconv.fractional_max_pool(
        x, (3, 3), output_ratio=0.75, samples=samples, data_format=CF
    )
    chex.assert_trees_all_equal(out, want)
    model.train()
    assert layer.deterministic is False
    assert layer(x, deterministic=True).shape == (1, 2, 6, 6)


def test_fractional_follows_nnx_view():
    """``nnx.view(model, deterministic=True)`` fixes the regions, as it switches off Dropout."""
    x = _x((1, 2, 8, 8), "fractional-view")
    model = nnx.Sequential(
        nnx.Dropout(0.5, rngs=nnx.Rngs(0)),
        jcn.FractionalMaxPool((3, 3), output_ratio=0.75, data_format=CF, rngs=nnx.Rngs(1)),
    )
    evaluated = nnx.view(model, deterministic=True)
    assert evaluated.layers[0].deterministic and evaluated.layers[1].deterministic
    assert model.layers[1].deterministic is False
    chex.assert_trees_all_equal(_call(evaluated, x), _call(evaluated, x))
    with pytest.raises(TypeError, match=r"FractionalMaxPool: `deterministic`"):
        nnx.view(model, deterministic="yes")

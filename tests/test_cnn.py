"""The demo's tiny CNN: loss and every parameter's gradient against the same network in PyTorch,
``check_grads`` on the whole loss in float64, and a short training run.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.test_util import check_grads

from jaxconv._demo import cnn, train

FEATURES = (6, 8)
BATCH = 16


@functools.cache
def _digits():
    return train.load_digits()


def _params(variant: str, seed: int = 0):
    """Initial parameters of the ``variant`` network, with random (non-zero) biases."""
    model = cnn.TinyCNN(pool=variant, features=FEATURES)
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1), jnp.float32))["params"]
    rng = np.random.default_rng(seed)
    for name in ("conv1", "conv2", "dense"):
        bias = params[name]["bias"]
        params[name]["bias"] = jnp.asarray(0.3 * rng.normal(size=bias.shape), bias.dtype)
    return model, params


def _pow(x, p):
    """x^p with the derivative's limit at x = 0 (0 for x and p); x^p * log(x) is NaN there."""
    positive = x > 0
    return torch.where(positive, x, torch.ones_like(x)).pow(p) * positive


TORCH_POOL = {
    "max": lambda x, p: F.max_pool2d(x, 2),
    "avg": lambda x, p: F.avg_pool2d(x, 2),
    "lp": lambda x, p: F.lp_pool2d(x, 2.0, 2),
    # PyTorch's LPPool2d takes p as a Python number; with p a tensor the same formula gives dp.
    "lp_learned": lambda x, p: _pow(F.avg_pool2d(_pow(x, p), 2) * 4, 1 / p),
    # The module's deterministic regions: u = 0.5 on every (batch, channel, axis).
    "fractional": lambda x, p: F.fractional_max_pool2d(
        x, 3, output_size=(5, 5), _random_samples=torch.full((x.shape[0], x.shape[1], 2), 0.5)
    ),
    "adaptive": lambda x, p: F.adaptive_max_pool2d(x, (5, 5)),
}


def _torch_loss_and_grads(variant, params, x, y):
    """The same network written with torch.nn.functional: loss and gradients, in JAX layouts."""
    t = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in _flat(params).items()}

    def conv(name, h):
        w = t[f"{name}/kernel"].permute(3, 2, 0, 1)
        return F.conv2d(h, w, t[f"{name}/bias"], padding=1)

    p = 1 + F.softplus(t["pool/p_raw"]) if "pool/p_raw" in t else None
    h = F.relu(conv("conv1", torch.tensor(np.moveaxis(x, -1, 1))))
    h = F.relu(conv("conv2", TORCH_POOL[variant](h, p)))
    h = F.adaptive_avg_pool2d(h, 2).permute(0, 2, 3, 1).flatten(1)
    logits = h @ t["dense/kernel"] + t["dense/bias"]
    loss = F.cross_entropy(logits, torch.tensor(y, dtype=torch.long))
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in t.items()}


def _flat(tree):
    return {
        "/".join(k.key for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _jax_loss(model, params, x, y):
    return cnn.loss_fn(model.apply({"params": params}, x, deterministic=True), y)


@pytest.mark.parametrize("variant", cnn.VARIANTS)
def test_loss_and_every_gradient_match_torch(variant):
    data = _digits()
    x, y = data.x_train[:BATCH], data.y_train[:BATCH]
    model, params = _params(variant)
    # full float32 convolutions: GPUs would otherwise multiply in TensorFloat-32
    with jax.default_matmul_precision("highest"):
        loss, grads = jax.jit(jax.value_and_grad(functools.partial(_jax_loss, model)))(params, x, y)
    want_loss, want = _torch_loss_and_grads(variant, params, x, y)
    ours = _flat(grads)
    assert set(ours) == set(want)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for name, g in want.items():
        assert np.isfinite(g).all()
        scale = np.abs(g).max()
        np.testing.assert_allclose(ours[name], g, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("variant", cnn.VARIANTS)
def test_check_grads_of_the_whole_loss_in_float64(variant):
    data = _digits()
    x = jnp.asarray(data.x_train[:4], jnp.float64)
    y = jnp.asarray(data.y_train[:4])
    model, params = _params(variant, seed=1)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)

    def loss(params):
        logits = model.apply(
            {"params": params}, x, deterministic=False, rngs={"fractional": jax.random.key(2)}
        )
        return cnn.loss_fn(logits, y)

    loss = jax.jit(loss)
    chex.assert_type(loss(params), jnp.float64)
    check_grads(loss, (params,), order=1, modes=("rev",), eps=1e-6)


def test_short_training_run_learns_the_digits_and_reports_p():
    data = _digits()
    config = train.TrainConfig(epochs=4, batch_size=32, learning_rate=0.02, max_shift=0)
    result = train.train("lp_learned", data, config, progress=False)
    assert result.test_accuracy >= 0.95
    assert len(result.history["test_accuracy"]) == 4
    assert result.history["train_loss"][-1] < result.history["train_loss"][0]
    chex.assert_trees_all_equal_shapes(
        result.params, cnn.TinyCNN(pool="lp_learned").init(jax.random.key(0), data.x_test[:1])
    )
    assert result.p is not None and result.p >= 1.0
    assert result.history["p"][-1] == result.p
    assert "| lp_learned |" in train.format_table([result])


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match=r"TinyCNN.*`pool`.*'median'"):
        cnn.TinyCNN(pool="median").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1), jnp.float32))

"""Data parallelism on 4 simulated CPU devices (a subprocess with its own XLA_FLAGS).

- Training with every batch split over 4 devices gives the parameters of the one-device run.
- Pooling and convolution on a batch-sharded array compile to programs without cross-device
  collectives, forward and backward, except the ops whose fast path is a ``lax.cond`` over the
  whole batch: those all-reduce scalars only. A training step (which must sum gradients) has
  an all-reduce, which shows the detector sees them.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = r"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxconv
from jaxconv._demo import train

COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")
report = {"devices": jax.device_count()}

data = train.load_digits()
config = train.TrainConfig(epochs=1, batch_size=32, features=(4, 8))
one_device, all_devices = train.make_mesh(jax.devices()[:1]), train.make_mesh()
report["train"] = {}
for variant in ("fractional",):
    runs = [
        train.train(variant, data, config, mesh=mesh, steps=3, progress=False)
        for mesh in (one_device, all_devices)
    ]
    leaves = [jax.tree.leaves(r.params) for r in runs]
    model = train.cnn.TinyCNN(pool=variant, features=config.features)
    start = jax.tree.leaves(train.init_params(model, data.x_train[:1], config.seed))
    report["train"][variant] = {
        "max_abs_diff": max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(*leaves, strict=True)
        ),
        "moved": max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(leaves[1], start, strict=True)
        ),
        "replicated": all(a.sharding.is_fully_replicated for a in leaves[1]),
        "devices": sorted({len(a.sharding.device_set) for a in leaves[1]}),
    }

sharded = NamedSharding(all_devices, P("batch"))
x = np.random.default_rng(0).random((8, 12, 12, 3)).astype(np.float32)
x = jax.device_put(jnp.asarray(x), sharded)
w = jnp.ones((3, 3, 3, 4), jnp.float32)
u = np.random.default_rng(1).random((8, 3, 2)) * 0.99
u = jax.device_put(jnp.asarray(u, jnp.float32), sharded)
_, indices = jaxconv.max_pool(x[:, :6, :6], (2, 2), return_indices=True)
ops = {
    "max_pool": lambda x: jaxconv.max_pool(x, (2, 2)),
    "max_pool ceil": lambda x: jaxconv.max_pool(x, (3, 3), 2, ceil_mode=True),
    "avg_pool": lambda x: jaxconv.avg_pool(x, (3, 3), 2, 1),
    "avg_pool global": lambda x: jaxconv.avg_pool(x, (12, 12)),
    "lp_pool": lambda x: jaxconv.lp_pool(x, 2.0, (2, 2)),
    "lp_pool traced p": lambda x: jaxconv.lp_pool(x, jnp.float32(3.0), (3, 3), 2),
    "adaptive_max_pool": lambda x: jaxconv.adaptive_max_pool(x, (5, 5)),
    "adaptive_avg_pool": lambda x: jaxconv.adaptive_avg_pool(x, (4, 4)),
    "adaptive_avg_pool uneven": lambda x: jaxconv.adaptive_avg_pool(x, (5, 5)),
    "adaptive_avg_pool global": lambda x: jaxconv.adaptive_avg_pool(x, (1, 1)),
    "fractional_max_pool": lambda x: jaxconv.fractional_max_pool(
        x, (2, 2), output_ratio=0.7, samples=u
    ),
    "fractional_max_pool integer alpha": lambda x: jaxconv.fractional_max_pool(
        x, (2, 2), output_ratio=0.5, samples=u
    ),
    "max_unpool": lambda x: jaxconv.max_unpool(x[:, :3, :3], indices, (2, 2)),
    "conv": lambda x: jaxconv.conv(x, w, padding=1),
    "conv_transpose": lambda x: jaxconv.conv_transpose(x, jnp.ones((3, 3, 4, 3)), stride=2),
}


def compiled(f, *args):
    return jax.jit(f).lower(*args).compile()


def all_reduce_shapes(text):
    return [
        line.split(" = ", 1)[1].split(" all-reduce", 1)[0]
        for line in text.splitlines()
        if " all-reduce(" in line
    ]


report["ops"] = {}
for name, op in ops.items():
    forward = compiled(op, x)
    g = jax.device_put(jnp.ones(forward.out_info.shape, jnp.float32), sharded)
    backward = compiled(lambda x, g, op=op: jax.vjp(op, x)[1](g)[0], x, g)
    texts = (("forward", forward.as_text()), ("backward", backward.as_text()))
    report["ops"][name] = {k: [c for c in COLLECTIVES if c in t] for k, t in texts}
    report["ops"][name]["all_reduce_shapes"] = [s for _, t in texts for s in all_reduce_shapes(t)]
    spec = forward.output_shardings.spec
    report["ops"][name]["out_batch_axis"] = spec[0] if len(spec) else None

model = train.cnn.TinyCNN(pool="max", features=(4, 8))
optimizer = train.make_optimizer(config, 10)
params = train.init_params(model, data.x_train[:1], 0)
params, state = train.replicate(all_devices, (params, optimizer.init(params)))
batch = [train.put_batch(all_devices, a[:32]) for a in (data.x_train, data.y_train)]
step = train.make_step(model, optimizer)
text = step.lower(params, state, *batch, jax.random.key(0)).compile().as_text()
report["train_step"] = [c for c in COLLECTIVES if c in text]
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(s for s in done.stdout.splitlines() if s.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


def test_four_simulated_devices(report):
    assert report["devices"] == 4


def test_sharded_training_equals_single_device_training(report):
    # The fractional variant: its random regions must not depend on how the batch is split.
    run = report["train"]["fractional"]
    assert run["replicated"] and run["devices"] == [4]
    assert run["moved"] > 1e-3  # the steps did change the parameters
    np.testing.assert_allclose(run["max_abs_diff"], 0.0, atol=1e-5)


# A lax.cond over the whole batch picks a fast path (README, Known limits): an all-reduce of
# scalars per call, never of data.
SCALAR_ALL_REDUCE = {
    "avg_pool global",
    "adaptive_avg_pool uneven",
    "adaptive_avg_pool global",
    "fractional_max_pool integer alpha",
}
LOCAL = [
    "max_pool",
    "max_pool ceil",
    "avg_pool",
    "lp_pool",
    "lp_pool traced p",
    "adaptive_max_pool",
    "adaptive_avg_pool",
    "fractional_max_pool",
    "max_unpool",
    "conv",
    "conv_transpose",
]


@pytest.mark.parametrize("op", LOCAL)
def test_batch_sharded_ops_compile_without_collectives(report, op):
    result = report["ops"][op]
    assert result["forward"] == [], result
    assert result["backward"] == [], result
    assert result["out_batch_axis"] == "batch", result


@pytest.mark.parametrize("op", sorted(SCALAR_ALL_REDUCE))
def test_batch_sharded_fast_path_choices_all_reduce_only_scalars(report, op):
    result = report["ops"][op]
    assert set(result["forward"]) | set(result["backward"]) == {"all-reduce"}, result
    shapes = result["all_reduce_shapes"]
    assert shapes and not any(re.search(r"\[\d", s) for s in shapes), result  # f32[], pred[]
    assert result["out_batch_axis"] == "batch", result


def test_every_sharded_op_is_checked(report):
    assert set(report["ops"]) == set(LOCAL) | SCALAR_ALL_REDUCE


def test_a_training_step_does_all_reduce_its_gradients(report):
    assert "all-reduce" in report["train_step"]

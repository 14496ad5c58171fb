"""Training the tiny CNN on scikit-learn's 8x8 digits with optax, data parallel with jax.sharding.

Data parallelism: :func:`make_mesh` builds a 1-D ``Mesh`` named ``"batch"`` over the devices.
Every training batch is one global array split on its leading axis over the mesh
(``NamedSharding(mesh, P("batch"))``); the parameters and the optimiser state are replicated
(``NamedSharding(mesh, P())``). ``jax.jit`` compiles one SPMD program from these shardings: each
device runs the network on its slice of the batch (pooling and convolution need no communication
across the batch) and XLA adds the all-reduce that sums the gradients. On a single device the
mesh has one device and the same code runs unchanged. The batch size must be a multiple of the
number of devices.

Multi-host: start the same script on every host and call, before any other JAX call::

    jax.distributed.initialize(
        coordinator_address="host0:1234", num_processes=N, process_id=i
    )  # no arguments needed on Cloud TPU, SLURM or Open MPI launches

``jax.devices()`` then lists the devices of all processes, :func:`make_mesh` spans them all,
and :func:`put_batch` hands ``jax.make_array_from_process_local_data`` only this process's
contiguous block of rows of each global batch (every process shuffles with the same seed, so they
agree on the batch). Parameters stay replicated everywhere; nothing else changes.
"""

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxconv._demo import cnn


@dataclasses.dataclass(frozen=True)
class Digits:
    """The fixed train/test split of ``sklearn.datasets.load_digits`` (pixels scaled to [0, 1])."""

    x_train: np.ndarray  # (N, 8, 8, 1) float32
    y_train: np.ndarray  # (N,) int32
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(test_size: int = 360, seed: int = 0) -> Digits:
    """The bundled 1797 8x8 digits (no download), split by a fixed stratified shuffle."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    data = sk_load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return Digits(x_tr, y_tr, x_te, y_te)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Model size, optimiser (adam, cosine-decayed learning rate), augmentation, seed."""

    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 5e-3
    weight_decay: float = 0.0
    features: tuple[int, int] = (32, 64)
    max_shift: int = 1
    seed: int = 0


@dataclasses.dataclass
class TrainResult:
    """What one training run produced; ``history`` holds one entry per epoch."""

    variant: str
    params: Any
    history: dict[str, list[float]]
    test_accuracy: float
    seconds: float
    p: float | None


def random_shift(x: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each image of ``(N, H, W, C)`` moved by up to ``max_shift`` pixels per axis (zero fill)."""
    if max_shift == 0:
        return x
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"batch"`` over ``devices`` (default: every device of every host)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("batch",))


def put_batch(mesh: Mesh, x: np.ndarray) -> jax.Array:
    """A global batch split over the mesh's ``"batch"`` axis (this process supplies its rows)."""
    size = mesh.devices.size
    if x.shape[0] % size:
        raise ValueError(
            f"put_batch: the batch size must be a multiple of the {size} devices of the mesh, "
            f"got a batch of {x.shape[0]}."
        )
    count, index = jax.process_count(), jax.process_index()
    rows = x.shape[0] // count
    local = x[index * rows : (index + 1) * rows]
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("batch")), local, x.shape)


def replicate(mesh: Mesh, tree):
    """Every leaf of ``tree`` replicated over the mesh (every process passes the full value)."""
    sharding = NamedSharding(mesh, P())

    def put(leaf):
        leaf = np.asarray(leaf)
        return jax.make_array_from_process_local_data(sharding, leaf, leaf.shape)

    return jax.tree.map(put, tree)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.epochs * steps_per_epoch)
    return optax.adamw(schedule, weight_decay=config.weight_decay)


def make_step(model: cnn.TinyCNN, optimizer: optax.GradientTransformation):
    """The jitted training step ``(params, opt_state, x, y, key) -> (params, opt_state, loss)``."""

    def loss(params, x, y, key):
        logits = model.apply(params, x, deterministic=False, rngs={"fractional": key})
        return cnn.loss_fn(logits, y)

    @jax.jit
    def step(params, opt_state, x, y, key):
        value, grads = jax.value_and_grad(loss)(params, x, y, key)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with floats
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def make_eval(model: cnn.TinyCNN):
    """The jitted evaluation ``(params, x, y) -> (mean loss, accuracy)``, deterministic pooling."""

    @jax.jit
    def evaluate(params, x, y):
        logits = model.apply(params, x, deterministic=True)
        accuracy = jnp.mean((jnp.argmax(logits, -1).astype(y.dtype) == y).astype(jnp.float32))
        return cnn.loss_fn(logits, y), accuracy

    return evaluate


def init_params(model: cnn.TinyCNN, sample: np.ndarray, seed: int):
    return model.init(jax.random.key(seed), jnp.asarray(sample))


def epoch_batches(data: Digits, config: TrainConfig, rng: np.random.Generator, count: int):
    """``count`` shuffled, randomly shifted host batches ``(x, y)`` of one pass over the data."""
    order = rng.permutation(len(data.x_train))
    for b in range(count):
        rows = order[b * config.batch_size : (b + 1) * config.batch_size]
        yield random_shift(data.x_train[rows], config.max_shift, rng), data.y_train[rows]


def _record(history: dict, params, losses: list, test_metrics) -> None:
    test_loss, accuracy = (float(v) for v in test_metrics)
    history["train_loss"].append(float(np.mean(jax.device_get(losses))))
    history["test_loss"].append(test_loss)
    history["test_accuracy"].append(accuracy)
    if (p := cnn.learned_p(params["params"])) is not None:
        history.setdefault("p", []).append(p)


def train(
    variant: str,
    data: Digits,
    config: TrainConfig = TrainConfig(),
    *,
    mesh: Mesh | None = None,
    steps: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the ``variant`` CNN; ``steps`` (if given) stops after that many optimiser steps."""
    mesh = make_mesh() if mesh is None else mesh
    model = cnn.TinyCNN(pool=variant, features=config.features)
    per_epoch = len(data.x_train) // config.batch_size
    optimizer = make_optimizer(config, per_epoch)
    step, evaluate = make_step(model, optimizer), make_eval(model)
    start = time.perf_counter()
    params = init_params(model, data.x_train[:1], config.seed)
    params, opt_state = replicate(mesh, (params, optimizer.init(params)))
    test = replicate(mesh, (data.x_test, data.y_test))
    key, rng = jax.random.key(config.seed + 1), np.random.default_rng(config.seed)
    history = {"train_loss": [], "test_loss": [], "test_accuracy": []}
    total = config.epochs * per_epoch if steps is None else steps
    bar = tqdm(total=total, desc=f"{variant:>10}", disable=not progress, leave=True)
    done = 0
    while done < total:
        losses = []
        for x, y in epoch_batches(data, config, rng, min(per_epoch, total - done)):
            batch = put_batch(mesh, x), put_batch(mesh, y)
            params, opt_state, loss = step(params, opt_state, *batch, jax.random.fold_in(key, done))
            losses.append(loss)
            done += 1
            bar.update()
        _record(history, params, losses, evaluate(params, *test))
        last = {k: f"{v[-1]:.4f}" for k, v in history.items() if k != "test_loss"}
        bar.set_postfix(last)
    bar.close()
    seconds = time.perf_counter() - start
    p = cnn.learned_p(params["params"])
    return TrainResult(variant, params, history, history["test_accuracy"][-1], seconds, p)


def format_table(results: Sequence[TrainResult]) -> str:
    """A markdown table: variant, test accuracy, training time, learned p."""
    lines = [
        "| variant | test accuracy | train time (s) | learned p |",
        "|---|---|---|---|",
    ]
    for r in results:
        p = "-" if r.p is None else f"{r.p:.4f}"
        lines.append(f"| {r.variant} | {100 * r.test_accuracy:.2f}% | {r.seconds:.1f} | {p} |")
    return "\n".join(lines)

"""The tiny CNN of the demo, built from ``jaxconv.linen`` modules, with a selectable pooling layer.

``conv(3x3, 32) - relu - pool - conv(3x3, 64) - relu - adaptive avg pool (2x2) - dense(10)`` on
8x8 single-channel digits, channels_last. The first pooling layer is one of :data:`VARIANTS`:

=============  ==================================================================================
``max``        ``MaxPool((2, 2))``: 8x8 -> 4x4
``avg``        ``AvgPool((2, 2))``
``lp``         ``LPPool(2.0, (2, 2))`` (the 2-norm of each window)
``lp_learned`` ``LPPool(2.0, (2, 2), learnable_p=True)``: ``p = 1 + softplus(p_raw)`` is trained
``fractional`` ``FractionalMaxPool((3, 3), output_size=(5, 5))``: random overlapping windows
               while training, the fixed sample ``u = 0.5`` when ``deterministic``
``adaptive``   ``AdaptiveMaxPool((5, 5))``: 8x8 -> 5x5 with overlapping windows
=============  ==================================================================================
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxconv import linen as jcl

VARIANTS = ("max", "avg", "lp", "lp_learned", "fractional", "adaptive")
NUM_CLASSES = 10


def pooling_layer(variant: str) -> nn.Module:
    """The first pooling layer of the CNN for one of :data:`VARIANTS`."""
    layers = {
        "max": lambda: jcl.MaxPool((2, 2), name="pool"),
        "avg": lambda: jcl.AvgPool((2, 2), name="pool"),
        "lp": lambda: jcl.LPPool(2.0, (2, 2), name="pool"),
        "lp_learned": lambda: jcl.LPPool(2.0, (2, 2), learnable_p=True, name="pool"),
        "fractional": lambda: jcl.FractionalMaxPool((3, 3), output_size=(5, 5), name="pool"),
        "adaptive": lambda: jcl.AdaptiveMaxPool((5, 5), name="pool"),
    }
    if variant not in layers:
        raise ValueError(f"TinyCNN: `pool` must be one of {VARIANTS}, got {variant!r}.")
    return layers[variant]()


class TinyCNN(nn.Module):
    """conv - relu - pool - conv - relu - adaptive avg pool - dense.

    Attributes:
        pool: which pooling layer follows the first convolution, one of :data:`VARIANTS`.
        features: channels of the two convolutions.

    Call with ``x`` of shape ``(batch, 8, 8, 1)``; returns logits ``(batch, 10)``. The
    ``fractional`` variant draws from the ``"fractional"`` rng stream unless ``deterministic``.
    """

    pool: str = "max"
    features: tuple[int, int] = (32, 64)

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        x = jcl.Conv(self.features[0], (3, 3), padding=1, name="conv1")(x)
        x = nn.relu(x)
        pool = pooling_layer(self.pool)
        x = pool(x, deterministic=deterministic) if self.pool == "fractional" else pool(x)
        x = jcl.Conv(self.features[1], (3, 3), padding=1, name="conv2")(x)
        x = nn.relu(x)
        x = jcl.AdaptiveAvgPool((2, 2), name="gap")(x)
        x = x.reshape((*x.shape[:-3], -1))
        return nn.Dense(NUM_CLASSES, name="dense")(x)


def loss_fn(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def learned_p(params) -> float | None:
    """The learned ``p`` of a ``lp_learned`` network's parameters (``None`` for other variants)."""
    pool = params.get("pool", {})
    if "p_raw" not in pool:
        return None
    return float(jcl.learned_p(pool["p_raw"]))

"""PNG figures of the demo: training curves per variant and the seed's Lp-pooling identities."""

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxconv


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(results: Sequence, path: str) -> str:
    """Train loss, test accuracy (and the learned p, if any) per epoch for every variant."""
    plt = _pyplot()
    learned = [r for r in results if "p" in r.history]
    panels = 3 if learned else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), constrained_layout=True)
    for r in results:
        epochs = np.arange(1, len(r.history["train_loss"]) + 1)
        style = {"marker": "o"} if len(epochs) < 3 else {}
        axes[0].plot(epochs, r.history["train_loss"], label=r.variant, **style)
        accuracy = 100 * np.asarray(r.history["test_accuracy"])
        axes[1].plot(epochs, accuracy, label=r.variant, **style)
    axes[0].set(yscale="log", xlabel="epoch", ylabel="training loss (cross-entropy)")
    axes[0].set_title("Training loss")
    final = min(r.test_accuracy for r in results)
    axes[1].set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(90 if final >= 0.95 else 0, 100))
    axes[1].axhline(98, color="grey", linestyle=":", label="98%")
    axes[1].set_title("Test accuracy (360 held-out digits)")
    if learned:
        for r in learned:
            epochs = np.arange(1, len(r.history["p"]) + 1)
            label = f"{r.variant}: p = 1 + softplus(p_raw)"
            axes[2].plot(epochs, r.history["p"], label=label, marker="o" if len(epochs) < 3 else "")
        axes[2].axhline(1, color="grey", linestyle=":", label="p = 1 (lower bound)")
        axes[2].set(xlabel="epoch", ylabel="p")
        axes[2].set_title("Learned Lp-pooling order")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Tiny CNN on 8x8 digits: one curve per pooling layer")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def lp_curve(c: jax.Array, ps: np.ndarray) -> np.ndarray:
    """Lp pooling (window 2, stride 1) of the seed's C for each ``p``: ``(len(ps), 2, 2)``."""
    x = jnp.asarray(c)[..., None]
    pool = jax.jit(lambda p: jaxconv.lp_pool(x, p, (2, 2), 1)[..., 0])
    return np.stack([np.asarray(pool(jnp.asarray(p, x.dtype))) for p in ps])


def _table_points(table: dict | None):
    """The finite-p rows of the seed walkthrough's Lp table: ``(ps, values (k, 4))``."""
    if not table:
        return None
    rows = [(p, np.ravel(v)) for p, v in zip(table["p"], table["lp"], strict=True) if p < np.inf]
    return np.array([p for p, _ in rows]), np.stack([v for _, v in rows])


def plot_lp_identities(c: jax.Array, path: str, table: dict | None = None) -> str:
    """The seed's 1.2(d): Lp pooling of C tends to max pooling as p grows; p = 1 is |S| * avg.

    ``table`` is what the seed's pooling walkthrough returned; its rows are drawn as markers.
    """
    plt = _pyplot()
    ps = np.geomspace(1.0, 100.0, 41)
    x = jnp.asarray(c)[..., None]
    curve = lp_curve(c, ps).reshape(len(ps), -1)
    maxima = np.asarray(jaxconv.max_pool(x, (2, 2), 1)[..., 0]).ravel()
    sums = 4 * np.asarray(jaxconv.avg_pool(x, (2, 2), 1)[..., 0]).ravel()
    points = _table_points(table)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k in range(curve.shape[1]):
        i, j = divmod(k, 2)
        col = colors[k % len(colors)]
        axes[0].plot(ps, curve[:, k], color=col, label=f"Lp pool, output ({i + 1},{j + 1})")
        axes[0].axhline(maxima[k], color=col, linestyle="--", linewidth=1)
        axes[0].plot([1.0], [sums[k]], "o", color=col, markerfacecolor="none", markersize=9)
        axes[1].plot(ps, curve[:, k] / maxima[k] - 1, color=col, label=f"output ({i + 1},{j + 1})")
        if points is not None:
            axes[0].plot(points[0], points[1][:, k], "x", color=col)
    axes[0].plot([], [], "k--", linewidth=1, label="max pool (p -> inf)")
    axes[0].plot([], [], "ko", markerfacecolor="none", label="4 x avg pool (p = 1)")
    if points is not None:
        axes[0].plot([], [], "kx", label="seed walkthrough table")
    axes[0].set(xscale="log", xlabel="p", ylabel="pooled value")
    axes[0].set_title("Lp pooling of the seed's C (2x2 window, stride 1)")
    axes[1].set(xscale="log", yscale="log", xlabel="p", ylabel="Lp / max - 1")
    axes[1].set_title("Relative gap to max pooling")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(results: Sequence, c: jax.Array, out: str, table: dict | None = None) -> list[str]:
    """Write every figure into ``out`` (created if needed); their paths."""
    os.makedirs(out, exist_ok=True)
    return [
        plot_training_curves(results, os.path.join(out, "training_curves.png")),
        plot_lp_identities(c, os.path.join(out, "lp_identities.png"), table),
    ]

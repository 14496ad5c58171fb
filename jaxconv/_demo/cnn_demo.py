"""The training part of the demo: every pooling variant of the tiny CNN, the table, the figures."""

import os

import jax

from jaxconv._demo import cnn, plots, train


def run(out: str, c: jax.Array, *, table: dict | None = None, quick: bool = False) -> list[str]:
    """Train every variant, print the accuracy table, write it and the figures to ``out``.

    ``c`` is the seed's C and ``table`` the seed pooling walkthrough's data (for the
    Lp-identities figure). ``quick`` trains two short epochs per variant. Returns the paths
    written.
    """
    mesh = train.make_mesh()
    print("=" * 72)
    print("Tiny CNN on scikit-learn's 8x8 digits, one run per pooling layer")
    print("=" * 72)
    print(
        f"data parallel over {mesh.devices.size} device(s) ({jax.devices()[0].platform}): each "
        "batch is split over the mesh axis 'batch', parameters replicated"
    )
    data = train.load_digits()
    print(f"train {len(data.x_train)} / test {len(data.x_test)} images (fixed stratified split)")
    config = train.TrainConfig()
    if quick:
        config = train.TrainConfig(2, 32, 0.02, features=(16, 32), max_shift=0)
    results = [train.train(variant, data, config, mesh=mesh) for variant in cnn.VARIANTS]
    summary = train.format_table(results)
    print(
        "\n" + summary + "\n(train time includes compilation; test accuracy after the last epoch)\n"
    )
    os.makedirs(out, exist_ok=True)
    table_path = os.path.join(out, "accuracy.md")
    with open(table_path, "w") as f:
        f.write(summary + "\n")
    return [table_path, *plots.write_all(results, c, out, table)]

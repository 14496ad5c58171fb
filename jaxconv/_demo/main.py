"""Entry point of ``python -m jaxconv demo``."""

import argparse
import os

import jax
import jax.numpy as jnp


def _seed_c() -> jax.Array:
    """The seed's C = conv(A, B), computed by jaxconv, as a (3, 3) matrix."""
    from jaxconv import conv
    from jaxconv._demo import seed

    a = jnp.asarray(seed.SEED_A)[..., None]
    b = jnp.asarray(seed.SEED_B)[..., None, None]
    return conv(a, b)[..., 0]


def _pooling_walkthrough(c: jax.Array) -> dict | None:
    """The seed's pooling section (its table data), when that walkthrough is installed."""
    try:
        from jaxconv._demo.seed_pooling import pooling_walkthrough
    except ImportError:
        return None
    return pooling_walkthrough(c)


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxconv demo")
    parser.add_argument("--out", default="demo_output", help="folder for plots and tables")
    parser.add_argument("--quick", action="store_true", help="short training, for smoke tests")
    args = parser.parse_args(argv)
    from jaxconv._demo import seed

    seed.conv_walkthrough()
    c = _seed_c()
    table = _pooling_walkthrough(c)
    from jaxconv._demo import cnn_demo

    paths = cnn_demo.run(args.out, c, table=table, quick=args.quick)
    print(f"Written to {os.path.abspath(args.out)}:")
    for path in paths:
        print(f"    {os.path.abspath(path)}")
    return 0

"""Entry point of ``python -m jaxconv demo``."""

import argparse


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxconv demo")
    parser.add_argument("--out", default="demo_output", help="folder for plots and tables")
    parser.add_argument("--quick", action="store_true", help="short training, for smoke tests")
    args = parser.parse_args(argv)
    from jaxconv._demo import seed

    seed.conv_walkthrough()
    del args
    return 0

"""Command line: ``python -m jaxconv demo``."""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["demo"]:
        print("usage: python -m jaxconv demo [--out DIR] [--quick]", file=sys.stderr)
        return 2
    from jaxconv._demo.main import run

    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""jaxconv's benchmark suite: jaxconv beside flax.linen, raw lax, equinox and PyTorch.

Run ``python -m bench`` (``make bench``) or ``python -m bench --quick`` (``make bench-quick``);
``--filter SUBSTR`` selects cases by name, ``--out DIR`` picks the folder of ``<device>.json``,
``<device>.md`` and ``<device>.png``. See ``bench/cli.py`` for every option.
"""

from bench.cases import Case, all_cases, select
from bench.cli import main, run_suite
from bench.measure import Settings

__all__ = ["Case", "Settings", "all_cases", "main", "run_suite", "select"]

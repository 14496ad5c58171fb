"""``python -m bench``: run the benchmark suite."""

import sys

from bench.cli import main, restart_with_allocator

restart_with_allocator(sys.argv[1:])
raise SystemExit(main())

"""Command line of the suite.

``python -m bench [--quick] [--filter SUBSTR] [--out DIR] [--device-name NAME] [...]``
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import torch

from bench import report
from bench.cases import Case, all_cases, select
from bench.machine import machine_info, usable_cores
from bench.measure import Settings, copy_bandwidth
from bench.runner import PEERS, run_cases
from bench.torch_peers import default_device

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# glibc's default serves every buffer over 32 MiB with a fresh mmap, so each call of a jitted
# function page-faults its whole output (about 25,000 faults and 57 ms against 8 ms for a
# 102 MB negation on the 2-core machine). One arena that never returns memory reuses it instead;
# PyTorch in the same process gains as well.
REUSE_TUNABLES = ":".join(
    (
        "glibc.malloc.arena_max=1",
        "glibc.malloc.mmap_max=0",
        "glibc.malloc.trim_threshold=68719476736",
    )
)
FULL = {"repeats": 20, "warmup": 2, "budget_s": 5.0, "copy_mb": 256, "min_time_s": 0.3}
QUICK = {"repeats": 5, "warmup": 1, "budget_s": 1.0, "copy_mb": 64, "min_time_s": 0.0}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small shapes, few cases (~1-2 min)")
    p.add_argument(
        "--filter", action="append", metavar="SUBSTR", help="run cases whose name contains it"
    )
    p.add_argument("--out", default=RESULTS, help="output folder (default bench/results)")
    p.add_argument("--device-name", help="file stem, default the JAX backend (cpu, gpu, tpu)")
    p.add_argument("--repeats", type=int, help="timed calls per peer (full 20, quick 5)")
    p.add_argument("--warmup", type=int, help="untimed calls first (full 2, quick 1)")
    p.add_argument("--budget", type=float, help="stop repeating after this many seconds")
    p.add_argument("--copy-mb", type=int, help="size of the copy-bandwidth array in MiB")
    p.add_argument("--threads", type=int, help="torch threads (default: usable cores)")
    p.add_argument(
        "--peers",
        help=f"comma list out of {','.join(PEERS)} (default all; on TPU, or on GPU without a "
        "CUDA build of PyTorch, no torch)",
    )
    p.add_argument(
        "--allocator",
        choices=("reuse", "system"),
        default="reuse",
        help="reuse: restart under GLIBC_TUNABLES that keep freed memory for reuse (default, "
        "Linux); system: the process's allocator as it is",
    )
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--render", metavar="JSON", help="rewrite the .md and .png of a results file")
    return p


def render(path: str) -> None:
    """Rewrite the markdown and chart beside an existing results JSON (no measuring)."""
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    base = os.path.splitext(path)[0]
    report.write_markdown(result, base + ".md")
    report.write_chart(result, base + ".png")


def _peers(arg: str | None, backend: str) -> tuple[str, ...]:
    if arg:
        peers = tuple(p.strip() for p in arg.split(",") if p.strip())
        unknown = [p for p in peers if p not in PEERS]
        if unknown:
            raise SystemExit(f"--peers: unknown {unknown}; expected some of {list(PEERS)}")
        return ("jaxconv", *(p for p in peers if p != "jaxconv"))
    if backend == "cpu" or default_device(backend) != "cpu":
        return PEERS
    return tuple(p for p in PEERS if not p.startswith("torch"))


def run_suite(
    cases: list[Case],
    out_dir: str,
    *,
    device_name: str | None = None,
    settings: Settings | None = None,
    peers: tuple[str, ...] | None = None,
    copy_mb: int = 256,
    threads: int | None = None,
    quick: bool = False,
) -> dict:
    """Run ``cases`` and write ``<device>.json/.md/.png`` into ``out_dir``; returns the report.

    While it runs, ``<device>.partial.json`` holds the cases measured so far (``--render`` turns
    it into tables if the run is cut short); it is removed once the three files are written.
    """
    start = time.perf_counter()
    backend = jax.default_backend()
    settings = settings or Settings(torch_device=default_device(backend))
    threads = threads or usable_cores()
    torch.set_num_threads(threads)
    peers = peers or _peers(None, backend)
    copy = copy_bandwidth(copy_mb * 2**20, settings, backend)
    result = {
        "device_name": device_name or backend,
        "machine": machine_info(threads, settings.torch_device),
        "settings": {**dataclasses.asdict(settings), "quick": quick, "peers": list(peers)},
        "copy": copy,
        "cases": [],
        "wall_s": 0.0,
    }
    os.makedirs(out_dir, exist_ok=True)
    partial = os.path.join(out_dir, result["device_name"] + ".partial.json")

    def checkpoint(case_result: dict) -> None:
        result["cases"].append(case_result)
        result["wall_s"] = time.perf_counter() - start
        report.write_json(result, partial)

    run_cases(cases, peers, settings, copy["reference_gbps"], on_case=checkpoint)
    result["files"] = report.write_all(result, out_dir)
    os.remove(partial)
    return result


def restart_with_allocator(argv: list[str]) -> None:
    """Restart ``python -m bench`` under :data:`REUSE_TUNABLES` when it is going to measure
    with ``--allocator reuse`` (the default) on Linux; glibc reads its tunables at start-up only.
    """
    args = parser().parse_args(argv)
    if args.allocator != "reuse" or args.list or args.render:
        return
    if not sys.platform.startswith("linux") or os.environ.get("GLIBC_TUNABLES") == REUSE_TUNABLES:
        return
    env = {**os.environ, "GLIBC_TUNABLES": REUSE_TUNABLES}
    os.execve(sys.executable, [sys.executable, "-m", "bench", *argv], env)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.render:
        render(args.render)
        return 0
    defaults = QUICK if args.quick else FULL
    cases = select(all_cases(args.quick), args.filter)
    if args.list or not cases:
        print("\n".join(c.name for c in cases) or "no case matches the filter")
        return 0 if cases or args.list else 1
    settings = Settings(
        torch_device=default_device(jax.default_backend()),
        repeats=args.repeats or defaults["repeats"],
        warmup=defaults["warmup"] if args.warmup is None else args.warmup,
        budget_s=args.budget or defaults["budget_s"],
        min_repeats=min(3, args.repeats or 3),
        # on accelerators nearly every call is fast: the minimum time would double a run
        min_time_s=0.0
        if args.repeats or jax.default_backend() != "cpu"
        else defaults["min_time_s"],
    )
    res = run_suite(
        cases,
        args.out,
        device_name=args.device_name,
        settings=settings,
        peers=_peers(args.peers, jax.default_backend()),
        copy_mb=args.copy_mb or defaults["copy_mb"],
        threads=args.threads,
        quick=args.quick,
    )
    done = f"{len(cases)} cases in {res['wall_s']:.0f} s; wrote "
    print(done + ", ".join(res["files"].values()), file=sys.stderr)
    return 0

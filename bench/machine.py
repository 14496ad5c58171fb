"""What the suite ran on: CPU, cores, accelerator, library versions, date and commit."""

import datetime
import os
import platform
import subprocess
from importlib import metadata

import jax

PACKAGES = ("jax", "jaxlib", "torch", "flax", "equinox", "numpy")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The short commit of the tree: ``BENCH_GIT_COMMIT`` when set (a copy of the working tree on
    another machine, whose git metadata may not match it), else ``git rev-parse``."""
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def _torch_device_name(torch_device: str) -> str:
    if torch_device == "cpu":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(torch.device(torch_device))


def machine_info(torch_threads: int, torch_device: str = "cpu") -> dict:
    """A JSON-ready description of the machine and software."""
    device = jax.devices()[0]
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "torch_threads": torch_threads,
        "torch_device": _torch_device_name(torch_device),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "jax_device": getattr(device, "device_kind", str(device)),
        "versions": {name: _version(name) for name in PACKAGES},
        "git_commit": _git_commit(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }

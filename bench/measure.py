"""Timing: warm-up then the median of repeats, the peers of a case taking turns
(:func:`time_in_turn`), compile time apart, memory and copy bandwidth.

JAX functions are jitted; ``jax.jit(f).lower(*args)`` and ``.compile()`` are timed separately
(``lower_s``, ``compile_s``), and the compiled executable is what runs, each call ended by
``block_until_ready``. The forward+backward mode computes the output and the vjp of a fixed random
cotangent (the same work as PyTorch's ``autograd.grad(y, inputs, ct)``). Peak memory of a JAX
program is its compiled ``memory_analysis()``: argument + output + temporary buffers.
"""

import dataclasses
import hashlib
import re
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np
import torch

from bench.inputs import cotangent
from bench.jax_peers import JaxJob
from bench.torch_peers import TorchJob


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long to measure each peer of a case."""

    repeats: int = 20
    min_repeats: int = 3
    warmup: int = 2
    budget_s: float = 8.0
    torch_device: str = "cpu"
    # fast calls repeat beyond ``repeats`` until this much time is spent (at most max_repeats):
    # sub-millisecond medians of 20 calls moved by 2x between runs
    min_time_s: float = 0.0
    max_repeats: int = 2000
    # the peers of a case take turns: each round times every peer with a share of the repeats,
    # budget and minimum time, so that a change in the machine's load weighs on all of them
    rounds: int = 3


def time_calls(call: Callable[[], object], settings: Settings, first_s: float = 0.0) -> list[float]:
    """Seconds of ``settings.repeats`` calls after warm-up (fewer once the budget is spent; more,
    up to ``settings.max_repeats``, until ``settings.min_time_s`` is spent).

    ``first_s`` is the time an already made first call took: when it alone exceeds the budget,
    that one time is the result (no warm-up, no repeats), so a pathological peer cannot stall
    the suite; when the warm-up calls would take more than a quarter of the budget, they are
    skipped (the first call was one).
    """
    if first_s > settings.budget_s:
        return [first_s]
    # the first call already warmed up; slow peers skip the extra warm-up calls
    warmup = settings.warmup if first_s * settings.warmup < settings.budget_s / 4 else 0
    for _ in range(warmup):
        call()
    times: list[float] = []
    start = time.perf_counter()
    spent = 0.0
    while len(times) < settings.repeats or (
        spent < settings.min_time_s and len(times) < settings.max_repeats
    ):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - start
        if len(times) >= settings.min_repeats and spent > settings.budget_s:
            break
    return times


@dataclasses.dataclass
class Prepared:
    """A peer ready to be timed: its call, how long its first call took, what it reports."""

    call: Callable[[], object]
    first_s: float
    meta: dict


def time_in_turn(prepared: dict[str, Prepared], settings: Settings) -> dict:
    """Per peer, the seconds of its timed calls, or the exception one of them raised.

    The peers take turns over ``settings.rounds`` rounds, the order reversed every other
    round; each round times a peer by :func:`time_calls` with its share of the settings
    (:func:`_round_share`), so a change in the machine's load during a case weighs on every
    peer alike. A peer whose first call alone exceeded the whole budget is timed by one more
    call (a first call can hold one-time work, such as a GPU library's autotuning).
    """
    rounds = max(1, settings.rounds)
    slow = [name for name, p in prepared.items() if p.first_s > settings.budget_s]
    out: dict = {name: _one_call(prepared[name].call) for name in slow}
    timed = [name for name in prepared if name not in out]
    out.update({name: [] for name in timed})
    for r in range(rounds):
        this = _round_share(settings, r, rounds)
        for name in timed if r % 2 == 0 else timed[::-1]:
            if isinstance(out[name], Exception):
                continue
            # the first call decides the first round's warm-up (never a time of its own here)
            first_s = min(prepared[name].first_s, this.budget_s) if r == 0 else 0.0
            try:
                out[name] += time_calls(prepared[name].call, this, first_s)
            except Exception as e:  # a peer's failure is its result
                out[name] = e
    return out


def _one_call(call: Callable[[], object]) -> list[float] | Exception:
    """The seconds of one call, or the exception it raised."""
    t0 = time.perf_counter()
    try:
        call()
    except Exception as e:  # a peer's failure is its result
        return e
    return [time.perf_counter() - t0]


def _round_share(settings: Settings, r: int, rounds: int) -> Settings:
    """Round ``r``'s part of ``settings``: the repeats split exactly (earlier rounds take the
    remainder), the budget and minimum time evenly, warm-up in the first round only."""

    def part(n: int) -> int:
        return n // rounds + (r < n % rounds)

    return dataclasses.replace(
        settings,
        repeats=part(settings.repeats),
        min_repeats=part(settings.min_repeats),
        max_repeats=part(settings.max_repeats),
        budget_s=settings.budget_s / rounds,
        min_time_s=settings.min_time_s / rounds,
        warmup=settings.warmup if r == 0 else 0,
    )


def summarize(times: list[float]) -> dict:
    """Median, min and max in milliseconds, and the number of repeats."""
    return {
        "ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "repeats": len(times),
    }


def _fwd_bwd(fn: Callable, n_diff: int) -> Callable:
    """``(*args, ct) -> (y, vjp(ct))`` with respect to the first ``n_diff`` arguments."""

    def fwd_bwd(*args_ct):
        *args, ct = args_ct
        diff, rest = args[:n_diff], args[n_diff:]
        y, pullback = jax.vjp(lambda *d: fn(*d, *rest), *diff)
        return y, pullback(ct)

    return fwd_bwd


def _cotangent(job: JaxJob) -> jax.Array:
    out = jax.eval_shape(job.fn, *job.args)
    return jax.numpy.asarray(cotangent(out.shape, job.channels_first)).astype(out.dtype)


def memory(compiled) -> dict | None:
    """Argument, output, temporary and peak (their sum) bytes of a compiled program."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if ma is None:
        return None
    out = {
        "argument_bytes": int(ma.argument_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
        "temp_bytes": int(ma.temp_size_in_bytes),
        "alias_bytes": int(ma.alias_size_in_bytes),
    }
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
    return out


def program_fingerprint(compiled) -> str | None:
    """A short hash of the optimized XLA program, without names of source files and lines.

    Two peers with the same fingerprint run the very same program (e.g. jaxconv.conv and the raw
    ``lax.conv_general_dilated`` it wraps), whatever their timings say.
    """
    try:
        text = compiled.as_text()
    except Exception:  # not every backend can print its program
        return None
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^(%|ENTRY)", line)), 0)
    body = "\n".join(lines[start:])
    body = re.sub(r", (metadata|origin)=\{[^}]*\}", "", body)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _jax_outputs(out) -> list[np.ndarray]:
    """The output and the first gradient (if any) as float32 numpy arrays."""
    leaves = jax.tree_util.tree_leaves(out)[:2]
    return [np.asarray(leaf.astype(np.float32)) for leaf in leaves]


def _torch_outputs(out) -> list[np.ndarray]:
    return [t.detach().float().cpu().numpy() for t in out[:2]]


def _nbytes(tree) -> int:
    return sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(tree))


def prepare_jax(job: JaxJob, mode: str) -> Prepared:
    """Compile a JAX job in ``mode`` (``"fwd"`` or ``"fwdbwd"``) and run it once."""
    fn, args = job.fn, job.args
    if mode == "fwdbwd":
        args = (*args, _cotangent(job))
        fn = _fwd_bwd(fn, job.n_diff)
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    first_s = time.perf_counter() - t2
    meta = {
        "status": "ok",
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "bytes_in": _nbytes(args),
        "bytes_out": _nbytes(out),
        "memory": memory(compiled),
        "program": program_fingerprint(compiled),
        "_outputs": _jax_outputs(out),
    }
    return Prepared(lambda: jax.block_until_ready(compiled(*args)), first_s, meta)


def _torch_bytes(tensors) -> int:
    return sum(t.element_size() * t.nelement() for t in tensors)


def _synchronizer(tensors) -> Callable[[], None]:
    """Waits for the queued GPU work of CUDA tensors (PyTorch launches asynchronously)."""
    if any(t.is_cuda for t in tensors):
        return torch.cuda.synchronize
    return lambda: None


def prepare_torch(job: TorchJob, mode: str) -> Prepared:
    """A PyTorch job run once: forward under no_grad, or forward and autograd.grad of a
    cotangent. On CUDA tensors each call ends with ``torch.cuda.synchronize()``.
    """
    fn, tensors = job.fn, job.tensors
    sync = _synchronizer(tensors)
    if mode == "fwd":

        def call():
            with torch.no_grad():
                out = (fn(*tensors),)
            sync()
            return out

        ins = tensors
    else:
        leaves = [t.detach().requires_grad_(True) for t in tensors[: job.n_diff]]
        rest = tensors[job.n_diff :]
        with torch.no_grad():
            y0 = fn(*leaves, *rest)
        ct = torch.from_numpy(cotangent(tuple(y0.shape), True)).to(y0.dtype)
        ct = torch.empty_like(y0).copy_(ct)

        def call():
            y = fn(*leaves, *rest)
            out = (y.detach(), *torch.autograd.grad(y, leaves, ct))
            sync()
            return out

        ins = (*tensors, ct)
    t0 = time.perf_counter()
    out = call()
    meta = {
        "status": "ok",
        "bytes_in": _torch_bytes(ins),
        "bytes_out": _torch_bytes(out),
        "_outputs": _torch_outputs(out),
    }
    return Prepared(call, time.perf_counter() - t0, meta)


def copy_bandwidth(nbytes: int, settings: Settings, backend: str) -> dict:
    """Read+write GB/s of a large float32 copy: numpy ``copyto`` and a jitted jnp negation."""
    n = max(nbytes // 4, 1)
    src = np.random.default_rng(2).standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)
    np_ms = summarize(time_calls(lambda: np.copyto(dst, src), settings))["ms"]
    a = jax.device_put(src)
    neg = jax.jit(jax.numpy.negative).lower(a).compile()
    jax_ms = summarize(time_calls(lambda: jax.block_until_ready(neg(a)), settings))["ms"]
    moved = 2 * src.nbytes
    res = {
        "bytes": int(src.nbytes),
        "numpy_copy_gbps": moved / np_ms / 1e6,
        "jax_negate_gbps": moved / jax_ms / 1e6,
    }
    if backend == "cpu":
        res["reference"] = max(("numpy_copy_gbps", "jax_negate_gbps"), key=res.get)
    else:
        res["reference"] = "jax_negate_gbps"
    res["reference_gbps"] = res[res["reference"]]
    return res

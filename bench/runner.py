"""Run cases against their peers and collect one JSON-ready result per case.

Each peer of a case ends in one status: ``ok`` (timed), ``missing`` (jaxconv has no such op yet),
``n/a`` (the peer library has no equivalent) or ``error`` (it raised; the message is kept).
Ratios are ``jaxconv ms / peer ms``: below 1.0 jaxconv is faster.
"""

import dataclasses
import gc
import sys
from collections.abc import Callable

import jax
import numpy as np

from bench import jax_peers, targets, torch_peers
from bench.cases import Case
from bench.inputs import make_inputs
from bench.measure import Prepared, Settings, prepare_jax, prepare_torch, summarize, time_in_turn

PEERS = ("jaxconv", "lax", "flax", "equinox", "torch_nchw", "torch_cl")
JAX_PEERS = ("jaxconv", "lax", "flax", "equinox")
CHANNELS_FIRST = ("equinox", "torch_nchw", "torch_cl")


def _prepare_peer(peer: str, case: Case, inputs, settings: Settings) -> Prepared | dict:
    """The peer built, compiled and run once, or its final status when it cannot run."""
    jax_peer = peer in JAX_PEERS
    try:
        if jax_peer:
            return prepare_jax(jax_peers.BUILDERS[peer](case, inputs), case.mode)
        job = torch_peers.BUILDERS[peer](case, inputs, settings.torch_device)
        return prepare_torch(job, case.mode)
    except jax_peers.MissingOpError as e:
        return {"status": "missing", "reason": str(e)}
    except jax_peers.NotApplicableError as e:
        return {"status": "n/a", "reason": str(e)}
    except NotImplementedError as e:
        if not jax_peer:  # e.g. PyTorch has no bfloat16 kernel for the op
            return {"status": "n/a", "reason": f"PyTorch: {e}"}
        return _error(e)
    except Exception as e:  # a peer's failure is a result, not a crash of the suite
        return _error(e)


def _error(e: Exception) -> dict:
    return {"status": "error", "error": f"{type(e).__name__}: {e}"[:1000]}


def _run_peers(case: Case, peers, settings: Settings) -> dict:
    """Every peer prepared, then timed in turn (:func:`bench.measure.time_in_turn`)."""
    inputs = make_inputs(case)
    prepared, results = {}, {}
    for peer in peers:
        p = _prepare_peer(peer, case, inputs, settings)
        if isinstance(p, Prepared):
            prepared[peer] = p
        else:
            results[peer] = p
    for peer, times in time_in_turn(prepared, settings).items():
        ok = not isinstance(times, Exception)
        results[peer] = {**prepared[peer].meta, **summarize(times)} if ok else _error(times)
    del prepared
    jax.clear_caches()
    gc.collect()
    return {peer: results[peer] for peer in peers}


def _agreement(results: dict, dtype: str) -> str | None:
    """Compare every peer's output (and first gradient) with a reference peer's, in place.

    Each timed peer gets ``max_rel_diff``: the largest absolute difference divided by the largest
    magnitude of the reference, and ``agrees`` (within 1e-3 in float32, 5e-2 in bfloat16).
    Returns the reference peer (PyTorch NCHW when it ran), or None when nothing ran.
    """
    outs = {}
    for peer, r in results.items():
        arrays = r.pop("_outputs", None)
        if arrays is not None:
            outs[peer] = [np.moveaxis(a, 1, -1) if peer in CHANNELS_FIRST else a for a in arrays]
    if not outs:
        return None
    ref = "torch_nchw" if "torch_nchw" in outs else next(iter(outs))
    tol = 1e-3 if dtype == "float32" else 5e-2
    for peer, arrays in outs.items():
        pairs = list(zip(arrays, outs[ref], strict=False))
        if any(a.shape != b.shape for a, b in pairs):
            diff = float("inf")
        else:
            diff = max(float(np.max(np.abs(a - b), initial=0.0)) for a, b in pairs)
            diff /= max(float(np.max(np.abs(b), initial=0.0)) for _, b in pairs) or 1.0
        results[peer]["max_rel_diff"] = diff if np.isfinite(diff) else None
        results[peer]["agrees"] = bool(diff <= tol)
    return ref


def _ratios(results: dict) -> dict:
    base = results.get("jaxconv", {})
    if base.get("status") != "ok":
        return {}
    return {
        peer: base["ms"] / r["ms"]
        for peer, r in results.items()
        if peer != "jaxconv" and r.get("status") == "ok" and r["ms"] > 0
    }


def _add_bandwidth(results: dict, reference_gbps: float) -> None:
    for r in results.values():
        if r.get("status") == "ok":
            r["gbps"] = (r["bytes_in"] + r["bytes_out"]) / r["ms"] / 1e6
            r["bandwidth_fraction"] = r["gbps"] / reference_gbps


def run_case(case: Case, peers, settings: Settings, reference_gbps: float) -> dict:
    """All peers of one case, their ratios and the targets that apply."""
    results = _run_peers(case, peers, settings)
    _add_bandwidth(results, reference_gbps)
    reference = _agreement(results, case.dtype)
    ratios = _ratios(results)
    return {
        "name": case.name,
        "case": dataclasses.asdict(case),
        "reference_peer": reference,
        "peers": results,
        "ratios": ratios,
        "targets": targets.evaluate(case, ratios, results),
    }


def format_line(result: dict) -> str:
    """One progress line: the case and each peer's median or status."""
    parts = []
    for peer, r in result["peers"].items():
        parts.append(f"{peer} {r['ms']:.3g} ms" if r["status"] == "ok" else f"{peer} {r['status']}")
    return f"{result['name']}: " + ", ".join(parts)


def run_cases(
    cases: list[Case],
    peers,
    settings: Settings,
    reference_gbps: float,
    log: Callable | None = None,
    on_case: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Every case in order, logging one line each (to stderr unless ``log`` is given) and
    handing each result to ``on_case`` as soon as it is measured."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = []
    for i, case in enumerate(cases, 1):
        result = run_case(case, peers, settings, reference_gbps)
        log(f"[{i}/{len(cases)}] {format_line(result)}")
        if on_case is not None:
            on_case(result)
        out.append(result)
    return out

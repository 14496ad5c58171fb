"""The speed targets of the speed and adaptive/fractional issues, checked per case.

A target is a peer and the largest acceptable ratio ``jaxconv time / peer time``: max pooling
forward+backward at least 5x faster than flax.linen (ratio <= 0.2) and no slower than PyTorch
channels_last; forward max, avg, Lp, adaptive and fractional pooling no slower than PyTorch
channels_last; conv within 2% of raw ``lax.conv_general_dilated``. Adaptive and fractional cases
also expect a jaxconv compile time under 1 s.
"""

from bench.cases import Case

COMPILE_LIMIT_S = 1.0
_TORCH_CL_OPS = ("avg_pool", "lp_pool", "adaptive_avg_pool", "adaptive_max_pool")


def case_targets(case: Case) -> list[tuple[str, float]]:
    """``(peer, max ratio)`` pairs that apply to ``case``."""
    if case.op == "max_pool":
        if case.mode == "fwdbwd":
            return [("flax", 0.2), ("torch_cl", 1.0)]
        return [("torch_cl", 1.0)]
    if case.op in _TORCH_CL_OPS or case.op == "fractional_max_pool":
        return [("torch_cl", 1.0)]
    if case.op == "conv":
        return [("lax", 1.02)]
    return []


def evaluate(case: Case, ratios: dict, results: dict) -> list[dict]:
    """Each target with its measured ratio and whether it is met (None when not measured).

    A ratio target also holds when jaxconv compiled to the very same XLA program as the peer
    (``same_program``): then any measured difference is noise.
    """
    out = []
    jaxconv = results.get("jaxconv", {})
    for peer, limit in case_targets(case):
        ratio = ratios.get(peer)
        program = jaxconv.get("program")
        same = program is not None and results.get(peer, {}).get("program") == program
        met = None if ratio is None else bool(ratio <= limit or same)
        out.append(
            {"peer": peer, "max_ratio": limit, "ratio": ratio, "same_program": same, "met": met}
        )
    if case.op.startswith(("adaptive", "fractional")) and jaxconv.get("status") == "ok":
        compile_s = jaxconv["lower_s"] + jaxconv["compile_s"]
        met = bool(compile_s < COMPILE_LIMIT_S)
        out.append({"compile_s_max": COMPILE_LIMIT_S, "compile_s": compile_s, "met": met})
    return out

"""Write a suite's results: ``<device>.json``, ``<device>.md`` (tables) and ``<device>.png``."""

import json
import os

from bench.runner import PEERS

LABELS = {
    "jaxconv": "jaxconv",
    "lax": "raw lax",
    "flax": "flax.linen",
    "equinox": "equinox",
    "torch_nchw": "torch NCHW",
    "torch_cl": "torch channels_last",
}
COLORS = {
    "lax": "tab:gray",
    "flax": "tab:blue",
    "equinox": "tab:green",
    "torch_nchw": "tab:orange",
    "torch_cl": "tab:red",
}


def write_json(report: dict, path: str) -> None:
    """The whole report as indented JSON (written to a temporary name, then renamed)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, sort_keys=False, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def _present_peers(cases: list[dict]) -> list[str]:
    """Peers that ran or are missing in at least one case (others would be empty columns)."""
    seen = {p for c in cases for p, r in c["peers"].items() if r["status"] != "n/a"}
    return [p for p in PEERS if p in seen]


def _cell(r: dict | None) -> str:
    if r is None or r["status"] == "n/a":
        return "–"
    if r["status"] == "ok":
        return f"{r['ms']:.3g}"
    return r["status"]


def _target_text(t: dict) -> str:
    if "peer" not in t:
        return f"compile < {t['compile_s_max']} s"
    same = " (same XLA program)" if t.get("same_program") else ""
    return f"÷{t['peer']} ≤ {t['max_ratio']}{same}"


def _targets_cell(case: dict) -> str:
    marks = []
    for t in case["targets"]:
        mark = "?" if t["met"] is None else ("✓" if t["met"] else "✗")
        marks.append(f"{mark} {_target_text(t)}")
    return "; ".join(marks)


def _row(case: dict, peers: list[str]) -> str:
    c, res = case["case"], case["peers"]
    times = [_cell(res.get(p)) for p in peers]
    ratios = [
        f"{case['ratios'][p]:.2f}" if p in case["ratios"] else "–" for p in peers if p != "jaxconv"
    ]
    jc = res.get("jaxconv", {})
    ok = jc.get("status") == "ok"
    bw = f"{jc['bandwidth_fraction']:.0%}" if ok else "–"
    comp = f"{jc['lower_s'] + jc['compile_s']:.2f}" if ok else "–"
    shape = "x".join(str(d) for d in c["shape"])
    cells = [c["label"], c["mode"], c["dtype"], shape, *times, *ratios, bw, comp]
    return "| " + " | ".join([*cells, _targets_cell(case)]) + " |"


def timing_table(cases: list[dict]) -> list[str]:
    """The main markdown table: medians, ratios, bandwidth, compile time, targets."""
    peers = _present_peers(cases)
    head = ["case", "mode", "dtype", "shape (NHWC)"]
    head += [f"{LABELS[p]} ms" for p in peers]
    head += [f"÷ {LABELS[p]}" for p in peers if p != "jaxconv"]
    head += ["jaxconv BW / copy", "jaxconv compile s", "targets"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + [_row(c, peers) for c in cases]


def _xla_peer(case: dict) -> str | None:
    """The XLA-default peer: raw lax for convolutions, else flax.linen where it has the op."""
    order = ("lax", "flax") if case["case"]["op"].startswith("conv") else ("flax", "lax")
    for peer in order:
        if case["peers"].get(peer, {}).get("status") == "ok":
            return peer
    return None


def summary_table(cases: list[dict]) -> list[str]:
    """A narrow table (for a README): jaxconv beside XLA's default and PyTorch channels_last."""
    head = "| case | mode | dtype | shape (NHWC) | jaxconv ms | flax.linen / lax ms | torch CL ms"
    lines = [head + " | ÷ XLA | ÷ torch CL |", "|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        c, res, ratios = case["case"], case["peers"], case["ratios"]
        xla = _xla_peer(case)
        cells = [c["label"], c["mode"], c["dtype"], "x".join(str(d) for d in c["shape"])]
        cells += [_cell(res.get("jaxconv")), _cell(res.get(xla)), _cell(res.get("torch_cl"))]
        cells += [f"{ratios[p]:.2f}" if p in ratios else "–" for p in (xla, "torch_cl")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def memory_table(cases: list[dict]) -> list[str]:
    """Peak memory (argument + output + temp) of max pooling forward+backward, jaxconv vs XLA."""
    head = "| case | dtype | shape | jaxconv peak MB | flax.linen peak MB | jaxconv temp MB"
    lines = [head + " | flax.linen temp MB | peak ratio |", "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        c = case["case"]
        if c["op"] != "max_pool" or c["mode"] != "fwdbwd":
            continue
        mem = {p: (case["peers"].get(p) or {}).get("memory") for p in ("jaxconv", "flax")}
        peak = {p: m["peak_bytes"] / 2**20 if m else None for p, m in mem.items()}
        temp = {p: m["temp_bytes"] / 2**20 if m else None for p, m in mem.items()}
        ratio = peak["jaxconv"] / peak["flax"] if peak["jaxconv"] and peak["flax"] else None
        vals = [peak["jaxconv"], peak["flax"], temp["jaxconv"], temp["flax"]]
        cells = ["–" if v is None else f"{v:.1f}" for v in vals]
        cells.append("–" if ratio is None else f"{ratio:.2f}")
        shape = "x".join(str(d) for d in c["shape"])
        lines.append("| " + " | ".join([c["label"], c["dtype"], shape, *cells]) + " |")
    return lines


def _problems(cases: list[dict]) -> list[str]:
    """Missing jaxconv ops (once each), then every error and every disagreement."""
    missing = sorted(
        {c["case"]["op"] for c in cases if c["peers"].get("jaxconv", {}).get("status") == "missing"}
    )
    lines = [f"- jaxconv has no {op} yet: its cases show `missing`." for op in missing]
    for case in cases:
        for peer, r in case["peers"].items():
            if r["status"] == "error":
                lines.append(f"- {case['name']}: {LABELS[peer]} error: {r['error']}")
            elif r["status"] == "ok" and not r.get("agrees", True):
                ref = LABELS[case["reference_peer"]]
                diff = r.get("max_rel_diff")
                what = "a different shape" if diff is None else f"relative difference {diff:.2g}"
                lines.append(f"- {case['name']}: {LABELS[peer]} disagrees with {ref}: {what}")
    return lines


def _target_summary(cases: list[dict]) -> list[str]:
    """How many targets are met, and the ones that are not."""
    checks = [(c, t) for c in cases for t in c["targets"] if t["met"] is not None]
    if not checks:
        return ["No target could be checked (jaxconv ops missing or peers not run).", ""]
    met = sum(t["met"] for _, t in checks)
    lines = [f"Targets met: {met} of {len(checks)}.", ""]
    for c, t in checks:
        if not t["met"]:
            got = f"{t['ratio']:.2f}" if "peer" in t else f"{t['compile_s']:.2f} s"
            lines.append(f"- not met: {c['name']}: {_target_text(t)} (got {got})")
    return lines + ([""] if met < len(checks) else [])


def _allocator(m: dict) -> str:
    tunables = m.get("glibc_tunables")
    if not tunables:
        return "the system's (glibc defaults: buffers over 32 MiB are fresh mmaps)."
    return f"`GLIBC_TUNABLES={tunables}` (freed memory is reused, not page-faulted again)."


def _repeats(s: dict) -> str:
    """How many calls each median is of, and in how many turns with the other peers."""
    turns = f" in {s['rounds']} turns with the other peers" if s.get("rounds", 1) > 1 else ""
    if not s.get("min_time_s"):
        return f"up to {s['repeats']} repeats{turns}"
    return (
        f"{s['repeats']} repeats or, for fast calls, as many as fit in {s['min_time_s']} s "
        f"(at most {s['max_repeats']}){turns}"
    )


def _torch_where(m: dict) -> str:
    device = m.get("torch_device", "cpu")
    if device == "cpu":
        return f"PyTorch on the CPU with {m['torch_threads']} threads"
    return f"PyTorch on CUDA ({device})"


def _header(report: dict) -> list[str]:
    m, s, cp = report["machine"], report["settings"], report["copy"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    return [
        f"# jaxconv benchmarks: {report['device_name']}",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, JAX backend {m['jax_backend']} "
        f"({m['jax_device']}), {_torch_where(m)}.",
        f"- Software: {versions}; Python {m['python']}.",
        f"- Allocator: {_allocator(m)}",
        *([f"- Note: {report['note']}."] if report.get("note") else []),
        f"- Run: {m['date_utc']}, commit {m['git_commit']}, "
        f"{'quick' if s['quick'] else 'full'} suite, median of {_repeats(s)} after "
        f"{s['warmup']} warm-up calls (at most ~{s['budget_s']} s per peer); "
        f"{len(report['cases'])} cases in {report['wall_s']:.0f} s.",
        f"- Copy reference ({cp['bytes'] / 2**20:.0f} MiB, read+write): numpy copy "
        f"{cp['numpy_copy_gbps']:.1f} GB/s, jitted jnp negation {cp['jax_negate_gbps']:.1f} GB/s; "
        f"bandwidth fractions use {cp['reference_gbps']:.1f} GB/s.",
        "",
        "Times are medians in ms. `÷ peer` is jaxconv time / peer time (below 1: jaxconv faster). "
        "`fwdbwd` is the forward pass plus the vjp of a fixed cotangent (PyTorch: autograd.grad). "
        "BW is (bytes in + bytes out) / time as a fraction of the copy reference. Compile is "
        "jaxconv's lower + compile time. `missing`: no such jaxconv op yet; `–`: the peer has no "
        "equivalent. Targets (issue 5 and the adaptive/fractional issue): ✓ met, ✗ not met, "
        "? not measured.",
        "",
        "Every peer's output (and, forward+backward, its input gradient) is compared with PyTorch "
        "NCHW's; the last section lists relative differences above 1e-3 (float32) or 5e-2 "
        "(bfloat16). Expected there: equinox's adaptive pooling when In % Out != 0 (its window "
        "boundaries are not PyTorch's, equinox issue 641), flax.linen's bfloat16 average over "
        "large windows (it sums in bfloat16), and bfloat16 ties that route a max gradient to "
        "another tied element.",
        "",
    ]


def markdown(report: dict) -> str:
    """The markdown page: header, targets, summary table, full table, memory, problems."""
    cases = report["cases"]
    lines = _header(report) + _target_summary(cases)
    lines += ["## Summary: jaxconv, XLA's default, PyTorch channels_last", ""]
    lines += summary_table(cases)
    lines += ["", "## All peers", "", *timing_table(cases)]
    lines += ["", "## Peak memory, max pooling forward+backward (compiled memory analysis)", ""]
    lines += memory_table(cases)
    problems = _problems(cases)
    if problems:
        lines += ["", "## Missing ops, errors and disagreements", "", *problems]
    return "\n".join(lines) + "\n"


def write_markdown(report: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown(report))


def _chart_panel(ax, cases: list[dict], peers: list[str], title: str, rows: int) -> None:
    """One panel: a group of horizontal bars (one per peer) for every case."""
    bar = 0.8 / max(len(peers), 1)
    for j, peer in enumerate(peers):
        ys = [i + j * bar for i, c in enumerate(cases) if peer in c["ratios"]]
        xs = [c["ratios"][peer] for c in cases if peer in c["ratios"]]
        ax.barh(ys, xs, height=bar, color=COLORS[peer], label=f"vs {LABELS[peer]}")
    ax.set_yticks([i + 0.4 - bar / 2 for i in range(len(cases))])
    labels = [c["name"].replace(f" {c['case']['dtype']}", "") for c in cases]
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(max(rows, len(cases)), -0.2)  # the same bar size in every panel
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_xlabel("jaxconv time / peer time (log; < 1: jaxconv faster)")
    ax.set_ylabel("case")
    ax.set_title(title)


def write_chart(report: dict, path: str) -> None:
    """Bars of jaxconv/peer ratios per case, one panel per dtype, log scale, a line at parity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in report["cases"] if c["ratios"]]
    peers = [p for p in PEERS if p != "jaxconv" and any(p in c["ratios"] for c in cases)]
    dtypes = sorted({c["case"]["dtype"] for c in cases}, reverse=True) or ["none"]
    rows = max([sum(c["case"]["dtype"] == d for c in cases) for d in dtypes] + [1])
    height = max(3.5, rows * (0.07 * max(len(peers), 1) + 0.1) + 1.5)
    fig, axes = plt.subplots(
        1, len(dtypes), figsize=(8 * len(dtypes), height), squeeze=False, sharex=True
    )
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        _chart_panel(ax, [c for c in cases if c["case"]["dtype"] == dtype], peers, dtype, rows)
    ratios = [r for c in cases for r in c["ratios"].values() if r > 0]
    axes[0][0].set_xlim(min([0.5, *ratios]) / 1.3, max([2.0, *ratios]) * 1.3)
    machine = report["machine"]
    title = f"jaxconv vs peers: {report['device_name']}, {machine['cpu']}"
    fig.suptitle(title, y=1 - 0.1 / height, va="top")
    if peers:
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(
            handles,
            labels,
            loc="upper center",
            ncol=len(peers),
            fontsize=8,
            bbox_to_anchor=(0.5, 1 - 0.4 / height),
        )
    else:
        axes[0][0].text(0.5, 0.5, "no ratios yet", ha="center", transform=axes[0][0].transAxes)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / height))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_all(report: dict, out_dir: str) -> dict:
    """All three files; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, report["device_name"])
    paths = {"json": base + ".json", "md": base + ".md", "png": base + ".png"}
    write_json(report, paths["json"])
    write_markdown(report, paths["md"])
    write_chart(report, paths["png"])
    return paths

"""Machinery of the differential fuzz tests: example counts, outcome tallies, layouts, references.

Every draw of a fuzz test ends in one of three outcomes, or is a disagreement:

- ``agree``: jaxconv and PyTorch both succeed and agree (values, indices, gradients);
- ``reject``: jaxconv raises a ValueError/TypeError naming the function, and PyTorch rejects the
  same configuration (or it breaks a documented rule of jaxconv's that PyTorch shares);
- ``reference``: the configuration is in a documented "jaxconv accepts more" class (asymmetric
  padding, max/Lp padding up to half the dilated span, Lp with padding or dilation, 1-D
  fractional pooling, ...), checked against the float64 loop references below (written with
  differentiable torch ops, so gradients are checked too).

``JAXCONV_FUZZ_EXAMPLES`` sets the draws per op (30 by default, derandomized). From 1000 draws on,
the run counts disagreements instead of stopping at the first one, and every test writes its tally
to ``JAXCONV_FUZZ_REPORT`` (a folder) if set; ``python tests/fuzz_support.py FOLDER`` prints one
line per op and a total. ``JAXCONV_FUZZ_TRACE`` (a file) records every draw before it runs, so
that a draw that kills the process (an XLA check failure) can be found.
"""

import dataclasses
import itertools
import json
import math
import os
import sys
import time

import numpy as np

EXAMPLES = int(os.environ.get("JAXCONV_FUZZ_EXAMPLES", "30"))
COUNT_MODE = EXAMPLES >= 1000 or os.environ.get("JAXCONV_FUZZ_COUNT") == "1"
REPORT_DIR = os.environ.get("JAXCONV_FUZZ_REPORT")
TRACE_FILE = os.environ.get("JAXCONV_FUZZ_TRACE")
OUTCOMES = ("agree", "reject", "reference")


class DisagreementError(AssertionError):
    """jaxconv and its oracle disagree on a draw."""


@dataclasses.dataclass(frozen=True)
class Common:
    """What every draw has: spatial rank, batch shape, channels, layout, dtype, data seed."""

    n: int
    batch: tuple
    channels: int
    data_format: str
    dtype: str
    seed: int


@dataclasses.dataclass
class Tally:
    op: str
    draws: int = 0
    agree: int = 0
    reject: int = 0
    reference: int = 0
    disagreements: int = 0
    seconds: float = 0.0
    failures: list = dataclasses.field(default_factory=list)

    def line(self) -> str:
        rate = self.draws / self.seconds if self.seconds else 0.0
        return (
            f"fuzz {self.op:<20} draws={self.draws:<6} agree={self.agree:<6} "
            f"reject={self.reject:<5} reference={self.reference:<6} "
            f"disagreements={self.disagreements:<3} {self.seconds:7.1f}s ({rate:.1f} draws/s)"
        )


def run_fuzz(op: str, strategy, check) -> Tally:
    """Run ``check(case)`` on ``EXAMPLES`` derandomized draws of ``strategy``; tally outcomes."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import UnsatisfiedAssumption

    tally = Tally(op)

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(strategy)
    def body(case):
        if TRACE_FILE:  # the last line names the draw that was running if the process dies
            with open(TRACE_FILE, "a") as f:
                f.write(f"{case!r}\n")
        try:
            outcome = check(case)
        except UnsatisfiedAssumption:
            raise
        except Exception as err:
            tally.draws += 1
            tally.disagreements += 1
            if len(tally.failures) < 20:
                tally.failures.append(f"{case!r}\n    {type(err).__name__}: {err}")
            if not COUNT_MODE:
                raise
            return
        assert outcome in OUTCOMES, outcome
        tally.draws += 1
        setattr(tally, outcome, getattr(tally, outcome) + 1)

    start = time.perf_counter()
    body()
    tally.seconds = time.perf_counter() - start
    print("\n" + tally.line())
    if REPORT_DIR:
        os.makedirs(REPORT_DIR, exist_ok=True)
        with open(os.path.join(REPORT_DIR, f"{op}.json"), "w") as f:
            json.dump(dataclasses.asdict(tally), f)
    assert tally.disagreements == 0, "\n".join(tally.failures[:5])
    return tally


def summarize(folder: str) -> int:
    """Print the tallies written to ``folder``, one line per op, and a total; the disagreements."""
    tallies = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                tallies.append(Tally(**json.load(f)))
    total = Tally("TOTAL")
    for t in tallies:
        print(t.line())
        for failure in t.failures[:3]:
            print("    " + failure)
        for field in ("draws", "agree", "reject", "reference", "disagreements", "seconds"):
            setattr(total, field, getattr(total, field) + getattr(t, field))
    print(total.line())
    return total.disagreements


# --- Layouts and comparisons -------------------------------------------------------------------


def to_torch_layout(x: np.ndarray, n: int, data_format: str) -> np.ndarray:
    """``(*batch, *spatial, C)`` or ``(*batch, C, *spatial)`` as PyTorch's ``(N, C, *spatial)``."""
    if data_format == "channels_last":
        x = np.moveaxis(x, -1, x.ndim - n - 1)
    return x.reshape((-1, *x.shape[x.ndim - n - 1 :]))


def from_torch_layout(y: np.ndarray, batch: tuple, n: int, data_format: str) -> np.ndarray:
    """The inverse of :func:`to_torch_layout` for an output with batch shape ``batch``."""
    y = y.reshape((*batch, *y.shape[1:]))
    if data_format == "channels_last":
        y = np.moveaxis(y, y.ndim - n - 1, -1)
    return y


def close(name: str, got, want, dtype, bound=None) -> None:
    """Raise :class:`DisagreementError` unless ``got`` matches ``want`` (tolerance by dtype).

    ``bound``, where given, is the sum of the absolute values of the terms that make up each
    entry (a sum of products): rounding error scales with it, not with the result."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        raise DisagreementError(f"{name}: shape {got.shape} != expected {want.shape}")
    if want.dtype.kind in "iu":
        if not np.array_equal(got, want):
            raise DisagreementError(f"{name}: {got.ravel()[:12]} != expected {want.ravel()[:12]}")
        return
    tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-10
    scale = max(1.0, float(np.max(np.abs(want[np.isfinite(want)]), initial=0.0)))
    atol = tol * (scale if bound is None else np.maximum(scale, np.asarray(bound, np.float64)))
    ok = np.isclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=atol)
    ok |= np.isnan(got) & np.isnan(want)
    if not ok.all():
        bad = np.argwhere(~ok)[0]
        raise DisagreementError(
            f"{name}: max |diff| {np.nanmax(np.abs(got - want)):.3g}; at {tuple(bad)} got "
            f"{got[tuple(bad)]!r}, expected {want[tuple(bad)]!r}"
        )


def cotangent(shape, dtype) -> np.ndarray:
    """A fixed, non-symmetric cotangent for gradient comparisons."""
    size = math.prod(shape)
    return np.cos(np.arange(size) * 0.7 + 0.3).reshape(shape).astype(dtype)


def resolve_pads(padding, n, sizes, kernel, stride, dilation):
    """``padding`` in any accepted form as ``n`` ``(lo, hi)`` pairs (an independent restatement)."""
    if isinstance(padding, str):
        if padding == "VALID":
            return ((0, 0),) * n
        if padding == "FULL":
            return tuple((d * (k - 1),) * 2 for k, d in zip(kernel, dilation, strict=True))
        pads = []
        for i, k, s, d in zip(sizes, kernel, stride, dilation, strict=True):
            total = max((math.ceil(i / s) - 1) * s + d * (k - 1) + 1 - i, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, int):
        return ((padding, padding),) * n
    return tuple(p if isinstance(p, tuple) else (p, p) for p in padding)


def pool_out_size(size, k, s, lo, hi, d, ceil_mode):
    """PyTorch's pooling output length (``Pool.h``) with asymmetric padding; may be < 1."""
    room = size + lo + hi - d * (k - 1) - 1
    out = (room + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + lo:
        out -= 1
    return out


# --- Loop references (float64, torch ops so that autograd gives their gradients) ----------------


def windows(sizes, kernel, stride, pads, dilation, outs):
    """Per output position (row-major), the flat positions of its valid taps in window order."""
    per_axis = []
    for i, k, s, (lo, _), d, o in zip(sizes, kernel, stride, pads, dilation, outs, strict=True):
        per_axis.append(
            [[t for t in (q * s - lo + j * d for j in range(k)) if 0 <= t < i] for q in range(o)]
        )
    strides = [math.prod(sizes[a + 1 :]) for a in range(len(sizes))]
    result = []
    for combo in itertools.product(*per_axis):
        flat = [
            sum(c * st for c, st in zip(pos, strides, strict=True))
            for pos in itertools.product(*combo)
        ]
        result.append(flat)
    return result


def window_counts(sizes, kernel, stride, pads, outs, include_pad):
    """Per output position, the avg divisor: taps inside ``[-lo, in+hi)`` or inside ``[0, in)``."""
    per_axis = []
    for i, k, s, (lo, hi), o in zip(sizes, kernel, stride, pads, outs, strict=True):
        low, high = (-lo, i + hi) if include_pad else (0, i)
        per_axis.append([min(q * s - lo + k, high) - max(q * s - lo, low) for q in range(o)])
    return [math.prod(c) for c in itertools.product(*per_axis)]


def reduce_windows(xt, wins, outs, reduce):
    """Apply ``reduce(values (N, C, m))`` to every window of ``xt`` (N, C, *sizes)."""
    import torch

    flat = xt.reshape(*xt.shape[:2], -1)
    parts = [reduce(flat[:, :, idx], idx) for idx in wins]
    return torch.stack(parts, dim=-1).reshape(*xt.shape[:2], *outs)


def ref_max(xt, wins, outs):
    """Max and flat argmax (first maximum wins) per window; ``-inf`` and -1 for empty windows."""
    import torch

    values, indices = [], []
    for idx in wins:
        if not idx:
            values.append(torch.full(xt.shape[:2], -math.inf, dtype=xt.dtype))
            indices.append(torch.full(xt.shape[:2], -1, dtype=torch.int64))
            continue
        part = xt.reshape(*xt.shape[:2], -1)[:, :, idx]
        best = torch.argmax(part, dim=-1)  # random data: no ties
        values.append(torch.gather(part, -1, best[..., None])[..., 0])
        indices.append(torch.as_tensor(idx)[best])
    shape = (*xt.shape[:2], *outs)
    return torch.stack(values, -1).reshape(shape), torch.stack(indices, -1).reshape(shape)


def ref_lp(xt, p, wins, outs):
    """The true p-norm of every window (padding contributes nothing); p = inf: max |x|."""
    if isinstance(p, float) and math.isinf(p):  # a window of padding only has norm 0
        return reduce_windows(
            xt, wins, outs, lambda v, idx: v.abs().amax(-1) if idx else v.new_zeros(v.shape[:2])
        )
    return reduce_windows(xt, wins, outs, lambda v, _: (v.abs() ** p).sum(-1) ** (1.0 / p))


def fractional_starts(size, out, k, u, dtype):
    """PyTorch's pseudo-random interval starts for one axis and sample ``u``, in ``dtype``."""
    if out == 1:
        return [size - k]
    f = np.dtype(dtype).type
    u = f(u)
    alpha = f(size - k) / f(out - 1)
    return [int((f(i) + u) * alpha) - int(u * alpha) for i in range(out - 1)] + [size - k]


if __name__ == "__main__":
    sys.exit(1 if summarize(sys.argv[1]) else 0)

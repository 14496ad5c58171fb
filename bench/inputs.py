"""Deterministic inputs of a case, and their layouts for each peer.

Every peer of a case sees the same numbers: a float32 channels_last array ``x`` and, depending on
the op, an ``extra`` array (conv: an HWIO weight; max_unpool: flat window-argmax indices in the
unpadded spatial volume, channels_last; fractional_max_pool: samples in ``[0, 1)`` of shape
``(N, C, n)`` in jaxconv's axis order). The helpers below give the channels_first copies the
channels-first peers (equinox, PyTorch) use.
"""

import dataclasses
import math

import numpy as np

from bench.cases import Case

SEED = 0


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The arrays of a case, in float32 (or int32 indices) and channels_last layout."""

    x: np.ndarray
    extra: np.ndarray | None = None


def make_inputs(case: Case) -> Inputs:
    """Random inputs for ``case`` (same seed for every case and peer)."""
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal(case.shape, dtype=np.float32)
    if case.op == "lp_pool":
        x = np.abs(x)
    extra = None
    if case.op in ("conv", "conv_transpose"):
        extra = _weight(case, rng)
    elif case.op == "max_unpool":
        extra = _unpool_indices(case, rng)
    elif case.op == "fractional_max_pool":
        extra = rng.random((case.shape[0], case.shape[-1], case.n), dtype=np.float32)
    return Inputs(x, extra)


def _weight(case: Case, rng: np.random.Generator) -> np.ndarray:
    """An HWIO weight; for conv_transpose, the weight of the conv it is the adjoint of."""
    c = case.shape[-1]
    if case.op == "conv":
        shape = (*case.window, c // case.groups, case.features)
    else:
        shape = (*case.window, case.features // case.groups, c)
    fan_in = math.prod(shape[:-1])
    return rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(fan_in))


def unpool_output_spatial(case: Case) -> tuple[int, ...]:
    """Unpooled spatial size, PyTorch's default ``(in - 1)*s - 2p + k``."""
    sp = case.shape[1:-1]
    return tuple(
        (i - 1) * s - 2 * case.padding + k
        for i, s, k in zip(sp, case.stride, case.window, strict=True)
    )


def _unpool_indices(case: Case, rng: np.random.Generator) -> np.ndarray:
    """One random in-window position per pooled value, as a flat unpadded spatial index."""
    out_sp = unpool_output_spatial(case)
    flat = np.zeros(case.shape, dtype=np.int64)
    for axis, (k, s, size) in enumerate(zip(case.window, case.stride, out_sp, strict=True)):
        pos_shape = [1] * len(case.shape)
        pos_shape[axis + 1] = case.shape[axis + 1]
        base = np.arange(case.shape[axis + 1]).reshape(pos_shape) * s - case.padding
        pos = np.clip(base + rng.integers(0, k, size=case.shape), 0, size - 1)
        flat = flat * size + pos
    return flat.astype(np.int32)


def cotangent(shape: tuple[int, ...], channels_first_layout: bool) -> np.ndarray:
    """A fixed random float32 cotangent: the same numbers for every peer, in its own layout."""
    logical = (shape[0], *shape[2:], shape[1]) if channels_first_layout else tuple(shape)
    ct = np.random.default_rng(SEED + 1).standard_normal(logical, dtype=np.float32)
    return channels_first(ct) if channels_first_layout else ct


def channels_first(a: np.ndarray) -> np.ndarray:
    """``(N, *spatial, C)`` to a contiguous ``(N, C, *spatial)``."""
    return np.ascontiguousarray(np.moveaxis(a, -1, 1))


def weight_oihw(w: np.ndarray) -> np.ndarray:
    """An HWIO weight ``(*k, I, O)`` as PyTorch's ``(O, I, *k)``."""
    n = w.ndim - 2
    return np.ascontiguousarray(np.transpose(w, (n + 1, n, *range(n))))


def samples_torch(s: np.ndarray) -> np.ndarray:
    """Fractional samples in PyTorch's axis order (reversed spatial axes)."""
    return np.ascontiguousarray(s[..., ::-1])

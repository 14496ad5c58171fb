"""The PyTorch peers of a case: NCHW contiguous and channels_last memory format.

Both get the case's numbers in logical NC* shape; ``torch_cl`` stores activations (and conv
weights) with channels innermost: ``torch.channels_last`` in 2-D, ``torch.channels_last_3d`` in
3-D, and in 1-D an ``(N, L, C)`` contiguous tensor viewed as ``(N, C, L)`` (what a user with
channels-last 1-D data would pass). The tensors live on the device the builder is given: the CPU,
or CUDA when the suite runs on a GPU backend.
"""

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench.cases import Case
from bench.inputs import Inputs, channels_first, samples_torch, weight_oihw
from bench.jax_peers import NotApplicableError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class TorchJob:
    """A forward function of tensors, the tensors, and how many leading ones get gradients."""

    fn: Callable
    tensors: tuple
    n_diff: int = 1


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """The same logical tensor with channels innermost in memory."""
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.transpose(1, -1).contiguous().transpose(1, -1)


def _tensor(a: np.ndarray, dtype: str | None, cl: bool, device: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    t = t.to(TORCH_DTYPES[dtype]) if dtype else t.to(torch.int64)
    t = t.to(device)
    return channels_last(t) if cl else t


def _pool_fn(case: Case) -> Callable:
    n, k, s, p = case.n, case.window, case.stride, case.padding
    if case.op == "max_pool":
        return lambda x: getattr(F, f"max_pool{n}d")(x, k, s, p)
    if case.op == "avg_pool":
        cip = case.count_include_pad
        return lambda x: getattr(F, f"avg_pool{n}d")(x, k, s, p, count_include_pad=cip)
    if case.op == "lp_pool":
        if p:
            raise NotApplicableError("torch lp_pool has no padding")
        return lambda x: getattr(F, f"lp_pool{n}d")(x, case.p, k, s)
    if case.op == "adaptive_avg_pool":
        return lambda x: getattr(F, f"adaptive_avg_pool{n}d")(x, case.output_size)
    if case.op == "adaptive_max_pool":
        return lambda x: getattr(F, f"adaptive_max_pool{n}d")(x, case.output_size)
    raise NotApplicableError(f"no torch builder for {case.op}")


def _fractional(case: Case, inp: Inputs, x: torch.Tensor) -> TorchJob:
    if case.n not in (2, 3):
        raise NotApplicableError("torch fractional_max_pool is 2-D and 3-D only")
    fn = getattr(F, f"fractional_max_pool{case.n}d")
    u = _tensor(samples_torch(inp.extra), case.dtype, False, str(x.device))

    def frac(x, u):
        return fn(x, case.window, output_ratio=(case.ratio,) * case.n, _random_samples=u)

    return TorchJob(frac, (x, u))


def _conv(case: Case, inp: Inputs, x: torch.Tensor, cl: bool) -> TorchJob:
    w = _tensor(weight_oihw(inp.extra), case.dtype, cl, str(x.device))
    s, p, g, n = case.stride, case.padding, case.groups, case.n
    if case.op == "conv":
        fn = lambda x, w: getattr(F, f"conv{n}d")(x, w, stride=s, padding=p, groups=g)  # noqa: E731
    else:
        op = case.output_padding
        conv_t = getattr(F, f"conv_transpose{n}d")
        fn = lambda x, w: conv_t(x, w, stride=s, padding=p, output_padding=op, groups=g)  # noqa: E731
    return TorchJob(fn, (x, w), 2)


def torch_job(case: Case, inp: Inputs, cl: bool, device: str = "cpu") -> TorchJob:
    """PyTorch's function for the case, on NCHW (``cl=False``) or channels_last tensors."""
    x = _tensor(channels_first(inp.x), case.dtype, cl, device)
    if case.op in ("conv", "conv_transpose"):
        return _conv(case, inp, x, cl)
    if case.op == "fractional_max_pool":
        return _fractional(case, inp, x)
    if case.op == "max_unpool":
        idx = _tensor(channels_first(inp.extra), None, cl, device)
        fn = getattr(F, f"max_unpool{case.n}d")
        return TorchJob(lambda v, i: fn(v, i, case.window, case.stride, case.padding), (x, idx))
    return TorchJob(_pool_fn(case), (x,))


BUILDERS = {
    "torch_nchw": lambda case, inp, device="cpu": torch_job(case, inp, False, device),
    "torch_cl": lambda case, inp, device="cpu": torch_job(case, inp, True, device),
}


def default_device(backend: str) -> str:
    """``"cuda"`` beside a JAX GPU backend when this PyTorch build sees a GPU, else ``"cpu"``."""
    return "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"

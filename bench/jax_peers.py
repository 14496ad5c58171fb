"""The JAX peers of a case: jaxconv, raw lax, flax.linen and equinox.

A builder returns a :class:`JaxJob`: a pure forward function of positional arrays, the arrays,
and how many leading arrays are differentiated in the forward+backward mode (``x``, or ``x`` and
the weight for convolutions). It raises :class:`MissingOpError` when jaxconv does not have the op
yet and :class:`NotApplicableError` when a peer library has no such op. jaxconv, lax and flax run
channels_last; equinox modules are unbatched channels_first, so they run vmapped over NCHW data.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench.cases import Case
from bench.inputs import Inputs, channels_first, unpool_output_spatial, weight_oihw


class MissingOpError(Exception):
    """jaxconv does not provide the op (yet)."""


class NotApplicableError(Exception):
    """The peer library has no equivalent of the case."""


@dataclasses.dataclass
class JaxJob:
    """A forward function, its arguments, and the number of leading differentiated arguments."""

    fn: Callable
    args: tuple
    n_diff: int = 1
    channels_first: bool = False


def _arr(a: np.ndarray, dtype: str) -> jax.Array:
    return jnp.asarray(a).astype(dtype) if a.dtype.kind == "f" else jnp.asarray(a)


def _pads(case: Case) -> tuple[tuple[int, int], ...]:
    return ((case.padding, case.padding),) * case.n


def jaxconv_job(case: Case, inp: Inputs) -> JaxJob:
    """jaxconv's function for the case."""
    import jaxconv

    f = getattr(jaxconv, case.op, None)
    if f is None:
        raise MissingOpError(f"jaxconv.{case.op} does not exist")
    x = _arr(inp.x, case.dtype)
    k, s, p = case.window, case.stride, case.padding
    if case.op == "max_pool":
        return JaxJob(lambda x: f(x, k, s, p), (x,))
    if case.op == "avg_pool":
        return JaxJob(lambda x: f(x, k, s, p, count_include_pad=case.count_include_pad), (x,))
    if case.op == "lp_pool":
        return JaxJob(lambda x: f(x, case.p, k, s, p), (x,))
    if case.op in ("adaptive_avg_pool", "adaptive_max_pool"):
        return JaxJob(lambda x: f(x, case.output_size), (x,))
    if case.op == "fractional_max_pool":
        fn = lambda x, u: f(x, k, output_ratio=case.ratio, samples=u)  # noqa: E731
        return JaxJob(fn, (x, jnp.asarray(inp.extra)))
    if case.op == "max_unpool":
        return JaxJob(lambda v, i: f(v, i, k, s, p), (x, jnp.asarray(inp.extra)))
    w = _arr(inp.extra, case.dtype)
    if case.op == "conv":
        return JaxJob(lambda x, w: f(x, w, stride=s, padding=p, groups=case.groups), (x, w), 2)
    if case.op == "conv_transpose":
        op = case.output_padding
        fn = lambda y, w: f(y, w, stride=s, padding=p, output_padding=op)  # noqa: E731
        return JaxJob(fn, (x, w), 2)
    raise NotApplicableError(f"no jaxconv builder for {case.op}")


def flax_job(case: Case, inp: Inputs) -> JaxJob:
    """flax.linen pooling (lax.reduce_window underneath) or flax.linen.Conv."""
    import flax.linen as nn

    x = _arr(inp.x, case.dtype)
    k, s, pads = case.window, case.stride, _pads(case)
    if case.op == "max_pool":
        return JaxJob(lambda x: nn.max_pool(x, k, s, pads), (x,))
    if case.op == "avg_pool":
        cip = case.count_include_pad
        return JaxJob(lambda x: nn.avg_pool(x, k, s, pads, count_include_pad=cip), (x,))
    if case.op == "conv":
        module = nn.Conv(case.features, k, s, pads, feature_group_count=case.groups, use_bias=False)
        fn = lambda x, w: module.apply({"params": {"kernel": w}}, x)  # noqa: E731
        return JaxJob(fn, (x, _arr(inp.extra, case.dtype)), 2)
    raise NotApplicableError(f"flax.linen has no {case.op}")


def _dimension_numbers(n: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, n + 1))
    return lax.ConvDimensionNumbers(
        (0, n + 1, *spatial), (n + 1, n, *range(n)), (0, n + 1, *spatial)
    )


def _lax_conv(case: Case) -> Callable:
    dn = _dimension_numbers(case.n)

    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, case.stride, _pads(case), dimension_numbers=dn, feature_group_count=case.groups
        )

    return conv


def _lax_conv_transpose(case: Case, y_dtype) -> Callable:
    """The exact adjoint of the lax conv, as jax.linear_transpose builds it."""
    conv = _lax_conv(case)
    spatial = tuple(d + case.output_padding for d in unpool_output_spatial(case))
    x_shape = (case.shape[0], *spatial, case.features)

    def conv_transpose(y, w):
        spec = jax.ShapeDtypeStruct(x_shape, y_dtype)
        return jax.linear_transpose(lambda x: conv(x, w), spec)(y)[0]

    return conv_transpose


def _lax_lp(case: Case) -> Callable:
    def lp(x):
        one = (1,)
        dims, strides = one + case.window + one, one + case.stride + one
        pads = ((0, 0), *_pads(case), (0, 0))
        zero = np.zeros((), x.dtype)  # concrete, so lax picks its differentiable sum
        s = lax.reduce_window(jnp.abs(x) ** case.p, zero, lax.add, dims, strides, pads)
        return s ** (1.0 / case.p)

    return lp


def _lax_unpool(case: Case) -> Callable:
    """A scatter of every value to its flat index, through channels_first."""
    out_sp = unpool_output_spatial(case)

    def unpool(v, idx):
        n, c = v.shape[0], v.shape[-1]
        vals = jnp.moveaxis(v, -1, 1).reshape(n, c, -1)
        flat = jnp.moveaxis(idx, -1, 1).reshape(n, c, -1)
        b = jnp.arange(n, dtype=jnp.int32)[:, None, None]
        ch = jnp.arange(c, dtype=jnp.int32)[None, :, None]
        out = jnp.zeros((n, c, int(np.prod(out_sp))), v.dtype).at[b, ch, flat].set(vals)
        return jnp.moveaxis(out.reshape(n, c, *out_sp), 1, -1)

    return unpool


def _lax_adaptive(case: Case) -> Callable:
    """Divisible adaptive pooling as a reshape and a mean or max over the window axes.

    (flax.linen's avg_pool with window In/Out is far slower here: its gradient is a
    reduce_window over the full window at every input position, minutes per call at 224 -> 7.)
    """
    sizes = case.shape[1:-1]
    if any(i % o for i, o in zip(sizes, case.output_size, strict=True)):
        raise NotApplicableError("In % Out != 0 is not a regular window")
    split = [d for i, o in zip(sizes, case.output_size, strict=True) for d in (o, i // o)]
    window_axes = tuple(range(2, 2 * case.n + 1, 2))
    reduce = jnp.mean if case.op == "adaptive_avg_pool" else jnp.max

    def adaptive(x):
        return reduce(x.reshape(x.shape[0], *split, x.shape[-1]), axis=window_axes)

    return adaptive


def lax_job(case: Case, inp: Inputs) -> JaxJob:
    """Raw lax/jnp: conv_general_dilated, reduce_window for Lp, reshape-reduce for divisible
    adaptive pooling, a scatter for unpooling."""
    x = _arr(inp.x, case.dtype)
    if case.op in ("adaptive_avg_pool", "adaptive_max_pool"):
        return JaxJob(_lax_adaptive(case), (x,))
    if case.op == "lp_pool":
        return JaxJob(_lax_lp(case), (x,))
    if case.op == "max_unpool":
        return JaxJob(_lax_unpool(case), (x, jnp.asarray(inp.extra)))
    if case.op == "conv":
        return JaxJob(_lax_conv(case), (x, _arr(inp.extra, case.dtype)), 2)
    if case.op == "conv_transpose":
        fn = _lax_conv_transpose(case, x.dtype)
        return JaxJob(fn, (x, _arr(inp.extra, case.dtype)), 2)
    raise NotApplicableError(f"{case.op}: compared with flax.linen, not raw lax")


def equinox_job(case: Case, inp: Inputs) -> JaxJob:
    """equinox.nn modules (unbatched, channels_first) vmapped over the batch."""
    import equinox as eqx

    x = _arr(channels_first(inp.x), case.dtype)
    n, k, s, p = case.n, case.window, case.stride, case.padding
    if case.op == "max_pool":
        module = getattr(eqx.nn, f"MaxPool{n}d")(k, s, p)
    elif case.op == "avg_pool" and (case.count_include_pad or p == 0):
        module = getattr(eqx.nn, f"AvgPool{n}d")(k, s, p)
    elif case.op == "adaptive_avg_pool":
        module = getattr(eqx.nn, f"AdaptiveAvgPool{n}d")(case.output_size)
    elif case.op == "adaptive_max_pool":
        module = getattr(eqx.nn, f"AdaptiveMaxPool{n}d")(case.output_size)
    elif case.op == "conv":
        return _equinox_conv(case, inp, x)
    else:
        raise NotApplicableError(f"equinox has no {case.op} of this kind")
    return JaxJob(jax.vmap(module), (x,), channels_first=True)


def _equinox_conv(case: Case, inp: Inputs, x: jax.Array) -> JaxJob:
    import equinox as eqx

    c_in, n = case.shape[-1], case.n
    module = getattr(eqx.nn, f"Conv{n}d")(
        c_in,
        case.features,
        case.window,
        case.stride,
        case.padding,
        groups=case.groups,
        use_bias=False,
        key=jax.random.key(0),
    )

    def conv(x, w):
        return jax.vmap(eqx.tree_at(lambda m: m.weight, module, w))(x)

    return JaxJob(conv, (x, _arr(weight_oihw(inp.extra), case.dtype)), 2, channels_first=True)


BUILDERS = {"jaxconv": jaxconv_job, "lax": lax_job, "flax": flax_job, "equinox": equinox_job}

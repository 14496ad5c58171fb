"""Lp pooling: the true p-norm over each window, with a derivative rule for ``x`` and ``p``.

Each window's norm is computed over the whole box at once by
:func:`jaxconv._src.boxmap.box_map` (interior outputs from plain strided slices, borders apart;
zero padding, and ``|0|^p = 0`` leaves a norm unchanged). The p-norm is separable,
``||x||_p over (i, j) = || ||x[:, j]||_p ||_p``, so windows of more than ``BOX_LIMIT``
elements are reduced one axis at a time instead (last spatial axis first), and the chain rule
composes the per-axis rules, ``d/dp`` included. Each stage is a ``jax.custom_vjp``.

Stability. Each norm is scaled by its window maximum ``m = max |x|``:
``y = m * (sum (|x|/m)^p)^(1/p)``, so no power exceeds 1 and nothing overflows for large ``p``
(64, 256) or in float16/bfloat16 (computed in float32 and returned in the input dtype). Where
``1/m`` would be subnormal (``m`` above 2^126 in float32, read as zero by XLA's CPU code) the
ratios are formed against a power-of-two fraction of ``m``. An all-zero window gives ``y = 0``,
a zero gradient and finite second derivatives (the root and non-integer powers are guarded at
0). With ``q = |x|/y <= 1``:

- ``dy/dx = sign(x) * q^(p-1)``;
- ``dy/dp = y/p * sum q^p log q`` (the scale-free form of
  ``y * (sum |x|^p log|x| / (p sum |x|^p) - log(sum |x|^p) / p^2)``; zero ``q`` terms give 0).

For a static ``p`` of 1 the input gradient is one window sum of an output-shaped array,
``sign(x) * S^T(g)``, computed as fast as the forward pass by
:func:`jaxconv._src.boxmap.sum_transpose`; for 2 it is ``x * S^T(g / y)``, with each output's
ratio scaled where ``g / y`` would be subnormal (:func:`_grad_x_p2`); other ``p`` go through
the per-tap ratios above, against a per-output inverse of ``y``. Measured on CPU (float32 NHWC
(32, 56, 56, 64), 3x3 s2, per-fusion times from ``jax.profiler`` with one XLA thread, best of
12, on a heavily loaded 2-core machine): the p=2 forward is one fused loop of about 2.5 ms; p=8
forward+backward took about 16 ms (34 ms when the gradient read a dilated copy of ``g`` and
``y``). With the default two XLA
threads the p=2 forward measured a median of 2.8-5.4 ms, against 6.4-13 ms in the same runs for
the unscaled ``sqrt(lax.reduce_window(x * x))``, which also overflows for large ``x``.

``p = inf`` (a Python float) is ``max |x|``; its gradient goes to the first maximum of ``|x|`` in
row-major window order, as max pooling's does.

A traced ``p``, and a static one of at least ``LOG_FORM_MIN_P``, take the norm, the input
gradient and ``d/dp`` in the log form of :mod:`jaxconv._src.lp_logs` (each window's maximum
and the log of its scaled sum, kept from the forward pass), which keeps float32 accuracy at
any ``p``, where a rounded ratio raised to the power ``p - 1`` loses about ``p`` units.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxconv._src import lp_logs
from jaxconv._src.args import check_floating, is_real
from jaxconv._src.avg import BOX_LIMIT
from jaxconv._src.boxmap import adjoint_map, box_map, box_taps, sum_transpose
from jaxconv._src.cast import round_to
from jaxconv._src.window import window_spec

_FNAME = "lp_pool"
# From this static p on (and for a traced p) the norm and its derivatives take the log form of
# lp_logs: with a rounded reciprocal or ratio each term (|x|/y)^(p-1) is off by about p/2
# units in the last place (float32 relative error about 1e-5 at p = 60, 1e-4 at 1000, 9e-3 at 1e5;
# the log form's is 1e-7 to 3e-7 at every p). Measured on float32 (32, 56, 56, 64), 3x3
# stride 2, forward plus backward: a traced p 128-132 ms against 235 before, a static
# p = 2000 119 against 211 ms; compiled in 1.5-1.7 against 0.5-0.6 s (more logarithms and
# exponentials inlined). Below it, integer powers are multiplications (p = 20: 20 ms).
LOG_FORM_MIN_P = 1024.0


def _power(r, p):
    """``r ** p`` for ``r >= 0``; integer powers of a static ``p`` as multiplications.

    Other powers give 0 at ``r = 0`` (NaN stays NaN) through a guarded base, so that no
    derivative of any order is NaN there (``d/dr r^p`` is infinite at 0 for ``p < 1``,
    ``d/dp 0^p`` is ``0 * log 0``); callers multiply the ``p = 0`` case (traced ``p - 1`` at
    ``p = 1``) by ``sign(0) = 0``.
    """
    if isinstance(p, float) and p.is_integer() and p <= 1024:
        return lax.integer_pow(r, int(p)) if p > 0 else jnp.ones_like(r)
    positive = r > 0
    return jnp.where(positive, jnp.power(jnp.where(positive, r, 1), p), jnp.where(r == 0, 0, r))


def _root(s, p):
    """``s ** (1/p)`` for ``s >= 0``."""
    if isinstance(p, float):
        if p == 1.0:
            return s
        if p == 2.0:
            return jnp.sqrt(s)
    return jnp.power(s, 1 / p)


def _ratio_scale(v):
    """A power of two ``c`` (1 unless ``v`` is huge) such that ``1/(v*c)`` is a normal number:
    ratios are then formed as ``(t*c) * (1/(v*c))``, exactly scaled. Above about 2^126 in
    float32 ``1/v`` would be subnormal, which XLA's CPU code reads as zero."""
    e = jnp.finfo(v.dtype).maxexp // 2
    return jnp.where(v > 2.0**e, jnp.asarray(2.0**-e, v.dtype), jnp.asarray(1, v.dtype))


def _safe_inverse(v):
    """``1/v`` where ``v`` is at least the smallest normal number, else 0 (NaN-free in every
    derivative order; the inverse of a subnormal ``v`` would overflow to inf)."""
    normal = v >= jnp.finfo(v.dtype).tiny
    return jnp.where(normal, 1 / jnp.where(normal, v, 1), 0)


def _ratio_inverse(y, c):
    """``1/(y * c)`` for the gradient's ratios ``(|x| * c) * (1/(y * c))``: 0 where ``y`` is
    below the normal range or infinite (so finite elements of a window holding an infinity get
    0), NaN where ``y`` is NaN (NaN at every element of the window, as in the log form)."""
    return jnp.where(jnp.isnan(y), y, _safe_inverse(y * c))


def _safe_divide(a, v):
    """``a / v`` where ``v`` is at least the smallest normal number, else ``a * 0`` (0, or NaN
    for a NaN ``a``: as ``a * _safe_inverse(v)``)."""
    normal = v >= jnp.finfo(v.dtype).tiny
    return jnp.where(normal, a / jnp.where(normal, v, 1), a * 0)


def _norm_of(parts, p):
    """The p-norm across ``parts`` (a static ``p`` below ``LOG_FORM_MIN_P``), scaled by their
    maximum.

    A window whose maximum is below the smallest normal number gives 0, on every backend: on
    CPU XLA flushes such subnormals to zero anyway, and elsewhere ``1/m`` would overflow to inf.
    """
    parts = [jnp.abs(t) for t in parts]
    if isinstance(p, float) and p == 1.0:
        return functools.reduce(jnp.add, parts)
    m = functools.reduce(jnp.maximum, parts)
    if p < 60:
        # Where 1/m would be subnormal, scale by m/4 instead: ratios up to 4, 4^p finite.
        huge = m > 2.0 ** (jnp.finfo(m.dtype).maxexp - 2)
        m = jnp.where(huge, m * 0.25, m)
        inv = _safe_inverse(m)
        s = functools.reduce(jnp.add, [_power(t * inv, p) for t in parts])
    else:  # ratios divided, so that 4^p cannot overflow
        c = _ratio_scale(m)
        s = functools.reduce(jnp.add, [_power(_safe_divide(t * c, m * c), p) for t in parts])
    # An all-zero window (s = 0) gives 0 through a guarded root: the root's derivative is
    # infinite at 0, which made second derivatives NaN. A window holding +-inf has an infinite
    # norm (inf/inf would give NaN).
    nonzero = s != 0  # NaN propagates
    y = jnp.where(nonzero, m * _root(jnp.where(nonzero, s, 1), p), 0)
    return jnp.where(jnp.isinf(m), m, y)


def _wide(x):
    """float16 and bfloat16 in float32 (converted inside the loops that read them)."""
    return x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x


def _log_form(p) -> bool:
    return not isinstance(p, float) or p >= LOG_FORM_MIN_P


def _box_norm(x, p, plans, store: bool = False):
    """The p-norm over every box window of ``plans`` (finite ``p``) and, in the log form, the
    window statistics of :func:`~jaxconv._src.lp_logs.window_stats` (else None); ``store`` as
    in :func:`~jaxconv._src.boxmap.box_map`."""
    if _log_form(p):
        stats = lp_logs.window_stats(x, p, plans)
        return lp_logs.norm(*stats, p), stats
    return box_map(x, plans, lambda parts, _: _norm_of(parts, p), 0, store=store), None


def _box_max(x, plans):
    return box_map(x, plans, lambda parts, _: functools.reduce(jnp.maximum, map(jnp.abs, parts)), 0)


def _grad_x(x, y, g, p, plans, stats):
    """``sum over windows of g * sign(x) * (|x|/y)^(p-1)``, computed at each input position.

    For p = 1 and 2 that is one window sum of an output-shaped array; otherwise each input
    position reads ``g`` and ``y`` of the windows that contain it (an adjoint map).
    """
    sizes = [plan.size for plan in plans]
    if isinstance(p, float) and p == 1.0:
        return jnp.sign(x) * sum_transpose(g, plans, sizes)
    if isinstance(p, float) and p == 2.0:
        return _grad_x_p2(x, y, g, plans, sizes)

    if _log_form(p):
        return lp_logs.grad_x(x, g, p, plans, sizes, stats)
    c = _ratio_scale(y)
    scale = _ratio_inverse(y, c)

    def spread(parts, extra):
        (xb,) = extra
        a = jnp.abs(xb)
        terms = [gt * _power((a * ct) * st, p - 1) for gt, st, ct in parts]
        return jnp.sign(xb) * functools.reduce(jnp.add, terms)

    return adjoint_map((g, scale, c), plans, sizes, spread, extras=(x,))


def _grad_x_p2(x, y, g, plans, sizes):
    """``x * S^T(g / y)`` for p = 2, one pass over output-shaped arrays. ``|x| <= y`` in every
    window that reads ``x``, so each term stays finite; norms below the normal range count as
    zero. ``g / y`` of a huge norm would fall below the normal range (read as zero on CPU), so
    each output's term is ``(x * c) * (g / (y * c))`` with :func:`_ratio_scale`'s ``c``. That
    costs a quarter: float32 NHWC (32, 56, 56, 64) 3x3 stride 2 forward plus backward 13.3-14.4
    against 10.7-10.9 ms for ``x * S^T(g / y)`` (bfloat16 16.2-16.6 against 14.3-15.2 ms)."""
    c = _ratio_scale(y)
    h = g * _ratio_inverse(y, c)

    def spread(parts, extra):
        (xb,) = extra
        return functools.reduce(jnp.add, [(xb * ct) * ht for ht, ct in parts])

    return adjoint_map((h, c), plans, sizes, spread, extras=(x,))


def _transpose_taps(x, plans, parts):
    """The adjoint of ``box_taps(x, plans, 0)`` applied to per-tap cotangents."""
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    (dx,) = jax.linear_transpose(lambda v: box_taps(v, plans, 0), spec)(parts)
    return dx


# Static p (a Python float): only x is differentiated.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _norm_static(x, plans, p: float):
    return _box_norm(_wide(x), p, plans)[0]


def _norm_static_fwd(x, plans, p):
    # The norm is stored: for 16-bit x, XLA otherwise recomputed the window maxima from x in
    # the output's rounding and in the gradient (p=2 3x3 stride 2 on (32, 56, 56, 64) forward
    # plus backward: float16 10.1 -> 5.8 ms, bfloat16 7.1 -> 6.0 ms; float32 unchanged).
    y, stats = _box_norm(_wide(x), p, plans, store=True)
    return y, (x, y, stats)


def _norm_static_bwd(plans, p, res, g):
    x, y, stats = res
    return (round_to(_grad_x(_wide(x), y, g, p, plans, stats), x.dtype, False),)


_norm_static.defvjp(_norm_static_fwd, _norm_static_bwd)


# Traced p (a scalar array): x and p are differentiated.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _norm_traced(x, p, plans):
    return _box_norm(x, p, plans)[0]


def _norm_traced_fwd(x, p, plans):
    y, stats = _box_norm(x, p, plans)
    return y, (x, y, p, stats)


def _norm_traced_bwd(plans, res, g):
    x, y, p, stats = res
    sizes = [plan.size for plan in plans]
    gx = lp_logs.grad_x(x, g, p, plans, sizes, stats)
    return gx, lp_logs.grad_p(x, y, g, p, plans, stats)


_norm_traced.defvjp(_norm_traced_fwd, _norm_traced_bwd)


def _first_max_mask(parts, m):
    """Per tap, True at the first tap equal to ``m`` (row-major tie rule)."""
    taken = jnp.zeros(m.shape, bool)
    masks = []
    for t in parts:
        hit = (t == m) & ~taken
        masks.append(hit)
        taken = taken | hit
    return masks


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _norm_inf(x, plans):
    return _box_max(x, plans)


def _norm_inf_fwd(x, plans):
    y = _box_max(x, plans)
    return y, (x, y)


def _norm_inf_bwd(plans, res, g):
    """The cotangent to each window's first maximum; NaN to every element of a NaN window
    (as for finite ``p``), where no element equals the maximum."""
    x, y = res
    parts = box_taps(x, plans, 0)
    masks = _first_max_mask([jnp.abs(t) for t in parts], y)
    rest = jnp.where(jnp.isnan(y), g * y, 0)
    grads = [jnp.where(k, g * jnp.sign(t), rest) for k, t in zip(masks, parts, strict=True)]
    return (_transpose_taps(x, plans, grads),)


_norm_inf.defvjp(_norm_inf_fwd, _norm_inf_bwd)


def _check_p(p):
    """``p`` as a Python float (static) or a scalar floating array (traced, learnable)."""
    if is_real(p):
        try:
            value = float(p)
        except OverflowError:
            raise ValueError(
                f"{_FNAME}: `p` must be a float >= 1 (or float('inf')), got an int of "
                f"{int(p).bit_length()} bits, beyond the float range."
            ) from None
        if math.isnan(value) or value < 1:
            raise ValueError(f"{_FNAME}: `p` must be >= 1 (or float('inf')), got {p!r}.")
        return value
    if not isinstance(p, (jax.Array, np.ndarray)):
        raise TypeError(
            f"{_FNAME}: `p` must be a Python float >= 1 or a scalar JAX array, got {p!r} of "
            f"type {type(p).__name__}."
        )
    if jnp.ndim(p) != 0 or not jnp.issubdtype(p.dtype, jnp.floating):
        raise TypeError(
            f"{_FNAME}: `p` as an array must be a floating scalar, got shape {jnp.shape(p)} "
            f"and dtype {p.dtype}."
        )
    if not isinstance(p, jax.core.Tracer):
        value = float(p)
        if math.isnan(value) or value < 1:
            raise ValueError(f"{_FNAME}: `p` must be >= 1, got the array value {value!r}.")
    return jnp.asarray(p)


def _norm(x, p, plans):
    if isinstance(p, float):
        return _norm_inf(x, plans) if math.isinf(p) else _norm_static(x, plans, p)
    return _norm_traced(x, p, plans)


def lp_pool(
    x: ArrayLike,
    p,
    window,
    stride=None,
    padding=0,
    *,
    dilation=1,
    ceil_mode: bool = False,
    data_format: str = "channels_last",
) -> jax.Array:
    """Lp pooling: the p-norm ``(sum |x|^p)^(1/p)`` over every window, for ``n`` spatial axes.

    ``p = 1`` is the window sum of ``|x|`` (``|S|`` times average pooling for ``x >= 0``),
    ``p = 2`` the Euclidean norm and ``p = inf`` the maximum of ``|x|``; as ``p`` grows the
    result tends to max pooling of ``|x|``. Padding and the overhang of ``ceil_mode`` count as
    zeros, which leave a norm unchanged: a partial window gives the norm of its in-bounds
    elements.

    Differences from ``torch.nn.functional.lp_pool{1,2,3}d``, which computes ``(sum x^p)^(1/p)``
    through average pooling and a sign trick: the two agree for ``x >= 0`` (any ``p``) and for
    even integer ``p`` on any ``x``, in windows that lie inside the input. PyTorch gives NaN or a
    wrong sign for negative ``x`` with other ``p``, has no padding or ``p = inf``, and inflates
    ceil-mode partial windows by the average-pooling divisor.

    Args:
      x: ``(*batch, *spatial, C)`` for channels_last or ``(*batch, C, *spatial)`` for
        channels_first, a floating dtype.
      p: a Python float or int ``>= 1`` or ``float("inf")`` (static), or a scalar floating JAX
        array (traced, e.g. a learned parameter). A traced ``p`` cannot be checked: it must be
        ``>= 1`` (a traced ``inf`` gives max ``|x|``; its gradient is ``1/ties`` at each of
        ``ties`` equal maxima, the limit of the finite-``p`` gradient).
      window: the window size per spatial axis, a sequence of ``n`` ints.
      stride: an int or ``n`` ints; ``None`` means ``window``.
      padding: an int, ``n`` ints, ``n`` ``(lo, hi)`` pairs, "VALID" or "SAME"; at most half
        the dilated window span on every side.
      dilation: an int or ``n`` ints, the spacing of window elements.
      ceil_mode: round the output size up (PyTorch's rule).
      data_format: "channels_last" or "channels_first".

    Returns:
      The pooled array, shape ``x.shape`` with the spatial sizes of
      :func:`jaxconv.conv_output_size`, dtype ``x.dtype``. float16 and bfloat16 are computed in
      float32. A window holding ``+-inf`` gives ``inf``, and its finite elements a zero
      gradient; the infinity itself gets ``sign(x)`` from a traced ``p`` or one of at least
      1024, NaN from a smaller static ``p`` (other than 1). A norm of finite elements that
      exceeds the dtype's range is ``inf`` too; its gradient is the true one in the log form
      (a traced ``p`` or one of at least 1024), 0 with a smaller static ``p``. A window
      holding NaN gives NaN and NaN gradients; for ``p = 1`` (a sum, whose gradient is
      ``sign(x)`` at every element) only the NaN element's.

    Transformations: ``jit``, ``vmap``, ``grad``/``vjp`` with respect to ``x`` and a traced
    ``p``, reverse-over-reverse (``grad`` of ``grad``, ``jacrev`` of ``jacrev``) and
    ``jax.hessian`` (forward over reverse). Not forward mode of the op itself: the derivative is
    a ``jax.custom_vjp``, so ``jvp`` and ``jacfwd`` raise.

    Example:
      >>> x = jnp.array([[3.0, 4.0], [0.0, 0.0]]).reshape(1, 2, 2, 1)
      >>> lp_pool(x, 2.0, (2, 2))[0, 0, 0, 0]
      Array(5., dtype=float32)
    """
    x = check_floating(_FNAME, "x", x)
    p = _check_p(p)
    spec = window_spec(_FNAME, x.shape, window, stride, padding, dilation, ceil_mode, data_format)
    compute = jnp.float32 if jnp.finfo(x.dtype).bits < 32 else x.dtype
    y = x if isinstance(p, float) and not math.isinf(p) else x.astype(compute)
    if not isinstance(p, float):
        p = p.astype(compute)
    groups = [spec.plans] if spec.window_size <= BOX_LIMIT else [(q,) for q in spec.plans[::-1]]
    for plans in groups:
        y = _norm(y, p, plans)
    return round_to(y, x.dtype)

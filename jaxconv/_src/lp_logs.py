"""Derivatives of the p-norm for large or traced ``p``, from logarithms of the ratios.

``dy/dx = sign(x) * (|x|/y)^(p-1)`` turns a relative error ``e`` of ``|x|/y`` into about
``p * e``: one rounding of the ratio costs ``p`` units in the last place (1% at ``p = 1e5`` in
float32), and ``y``, rounded once, carries such an error itself. So each window's terms are
formed from its maximum ``m = max |x|`` instead, with ``L = log(|x|/m) <= 0`` taken from
``|x| - m`` where ``|x| >= m/2`` (exact there), and ``log S`` with ``S = sum exp(p*L)`` in
``[1, taps]``:

- ``(|x|/y)^(p-1) = exp((p-1)*L - (1 - 1/p)*log S)``;
- ``dy/dp = y/p * sum q^p log q`` with ``q^p = exp(p*L - log S)`` and ``log q = L - log S/p``.

Every exponent is at most 0 and known to a few units of its own size, so each term is about as
accurate as one ``exp``. A traced ``p = inf`` gives ``L = 0`` exactly at the maxima, where
products with ``p`` are taken as 0, and ``exp(-inf) = 0`` elsewhere: the gradient is
``1/ties`` at each of ``ties`` equal maxima, the limit of the finite-``p`` gradient.
"""

import functools

import jax.numpy as jnp

from jaxconv._src.boxmap import adjoint_map, box_taps

# exp(-_EXP_ZERO) is 0 in float32 and float64: products below it are clamped there
_EXP_ZERO = 1000.0


def _scaled(log_ratio, k):
    """``k * log_ratio`` for ``log_ratio <= 0``, as the exponent of a term, with every
    derivative finite: at least ``-_EXP_ZERO`` (whose ``exp`` is 0 as well), and an infinite
    ``k`` (a traced ``p = inf``, or a static ``p`` beyond the dtype's range) taken as the
    largest finite number.

    At the window maximum (``log_ratio == 0``) the derivative of ``log_ratio`` is ``dx/x -
    dm/m``: 0 at a single maximum, not where several elements tie for it (the maximum's
    tangent is shared among them), so it is kept, except from ``k = 1/eps`` on (float32
    8.4e6, float64 4.5e15). There the two terms, each about ``k`` times their difference once
    multiplied, cancel to ``k * eps`` or worse (``0 * inf``, NaN, for an infinite ``k``), and
    the product is held at 0: exact at a single maximum, 0 in the second derivatives at ties.
    """
    big = float(jnp.finfo(log_ratio.dtype).max)
    k = min(k, big) if isinstance(k, float) else jnp.minimum(k, big)
    product = k * log_ratio
    # a select (NaN kept), not jnp.maximum, whose derivative multiplies the other side's by 0
    product = jnp.where(product < -_EXP_ZERO, -_EXP_ZERO, product)
    cancels = k >= 1 / float(jnp.finfo(log_ratio.dtype).eps)
    return jnp.where((log_ratio == 0) & cancels, 0, product)


def _log_ratio(a, m):
    """``log(a/m)`` for ``0 <= a <= m`` and a normal ``m``: from ``a - m`` (exact) where
    ``a >= m/2``. Ratios below the smallest normal number count as it, so the logarithm stays
    finite (``p = 1`` multiplies it by 0); each branch's argument is clamped into its own range,
    so that no derivative of any order is NaN."""
    d = (a - m) / m
    near = d >= -0.5
    r, tiny = a / m, jnp.finfo(m.dtype).tiny
    # selects, not jnp.maximum, whose derivative at a tie (d = -0.5: a = m/2) is half; NaN kept
    far = jnp.log(jnp.where(r < tiny, tiny, r))
    return jnp.where(near, jnp.log1p(jnp.where(near, d, -0.5)), far)


def _window_log_ratio(a, m):
    """:func:`_log_ratio` of an element ``a`` of a window with maximum ``m``. Windows whose
    maximum is below the normal range (all-zero windows, and those beyond the edges, which
    read ``m = 0`` and ``g = 0``) count as ``a = 0`` against 1; windows holding an infinity as
    their infinite elements (1) against 1, the limit of large equal maxima. NaN propagates."""
    huge = jnp.isinf(m)
    small = m < jnp.finfo(m.dtype).tiny
    a = jnp.where(huge, jnp.isinf(a).astype(a.dtype), jnp.where(small, 0, a))
    m = jnp.where(huge | small, 1, m)
    # below 1 both are scaled up by an exact power of two, so that ``a - m`` stays normal:
    # XLA's CPU code flushes subnormal differences to 0 (maxima of 1 to 4 times the smallest
    # normal number then took elements near them for ties: 12% off in float32)
    lift = jnp.where(m < 1, jnp.asarray(2.0 ** (jnp.finfo(m.dtype).nmant + 2), m.dtype), 1)
    return _log_ratio(a * lift, m * lift)


def window_stats(x, p, plans):
    """Each window's ``m = max |x|`` and ``log S`` (0 where ``m`` is below the normal range).

    One block over padded taps: split into the interior and the borders as in
    :func:`~jaxconv._src.boxmap.box_map`, each block would inline its own logarithms and
    exponentials, and compile time grows with them."""
    parts = [jnp.abs(t) for t in box_taps(x, plans, 0)]
    m = functools.reduce(jnp.maximum, parts)
    s = functools.reduce(jnp.add, [jnp.exp(_scaled(_window_log_ratio(a, m), p)) for a in parts])
    return m, jnp.where(m < jnp.finfo(m.dtype).tiny, 0, jnp.log(s))


def norm(m, log_s, p):
    """The p-norm ``m * S^(1/p)`` from :func:`window_stats`: 0 where ``m`` is below the normal
    range, infinite where it is, NaN where a window holds NaN."""
    y = jnp.where(m < jnp.finfo(m.dtype).tiny, 0, m * jnp.exp(log_s / p))
    return jnp.where(jnp.isinf(m), m, y)


def grad_x(x, g, p, plans, sizes, stats):
    """``sum over windows of g * sign(x) * (|x|/y)^(p-1)``, at each input position, from the
    windows' ``stats`` (:func:`window_stats`)."""
    m, log_s = stats
    g = jnp.where(m < jnp.finfo(m.dtype).tiny, 0, g)
    shift = (1 - 1 / p) * log_s

    def spread(parts, extra):
        (xb,) = extra
        a = jnp.abs(xb)
        terms = [
            gt * jnp.exp(_scaled(_window_log_ratio(a, mt), p - 1) - st) for gt, mt, st in parts
        ]
        return jnp.sign(xb) * functools.reduce(jnp.add, terms)

    return adjoint_map((g, m, shift), plans, sizes, spread, extras=(x,))


def grad_p(x, y, g, p, plans, stats):
    """``sum over outputs of g * y/p * sum q^p log q`` with ``q = |x|/y``, over padded taps
    in one block (see :func:`window_stats`)."""
    m, log_s = stats
    total = jnp.zeros_like(m)
    for t in box_taps(x, plans, 0):
        log_ratio = _window_log_ratio(jnp.abs(t), m)
        total = total + jnp.exp(_scaled(log_ratio, p) - log_s) * (log_ratio - log_s / p)
    return jnp.sum(g * y * total) / p

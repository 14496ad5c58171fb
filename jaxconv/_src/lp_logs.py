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

from jaxconv._src.boxmap import adjoint_map, block_of, box_map


def _scaled(log_ratio, k):
    """``k * log_ratio``, 0 where ``log_ratio`` is 0 (also for ``k = inf``)."""
    return jnp.where(log_ratio == 0, 0, k * log_ratio)


def _log_ratios(a, m):
    """``log(a/m)`` for ``0 <= a <= m``, and a mask of the terms that count: ``a > 0`` and
    ``m`` at least the smallest normal number (windows below it give 0). Ratios below the
    smallest normal number count as it, so the logarithm stays finite (``p = 1`` multiplies it
    by 0). Inputs outside each branch are replaced before any logarithm, so that no
    derivative of any order is NaN."""
    tiny = jnp.finfo(m.dtype).tiny
    valid = (a > 0) & (m >= tiny)
    m = jnp.where(valid, m, 1)
    a = jnp.where(valid, a, 1)
    near = a >= 0.5 * m
    close = jnp.log1p((jnp.where(near, a, m) - m) / m)
    far = jnp.log(jnp.maximum(jnp.where(near, m, a) / m, tiny))
    return jnp.where(near, close, far), valid


def _log_sum(parts, p):
    """Each window's ``m = max |x|`` and ``log S``, from its taps ``parts``."""
    parts = [jnp.abs(t) for t in parts]
    m = functools.reduce(jnp.maximum, parts)
    terms = []
    for a in parts:
        log_ratio, valid = _log_ratios(a, m)
        terms.append(jnp.where(valid, jnp.exp(_scaled(log_ratio, p)), 0))
    s = functools.reduce(jnp.add, terms)
    return m, jnp.log(jnp.where(s > 0, s, 1))


def grad_x(x, g, p, plans, sizes):
    """``sum over windows of g * sign(x) * (|x|/y)^(p-1)``, at each input position."""
    m = box_map(x, plans, lambda parts, _: _log_sum(parts, p)[0], 0)
    log_s = box_map(x, plans, lambda parts, _: _log_sum(parts, p)[1], 0)
    shift = (1 - 1 / p) * log_s

    def spread(parts, extra):
        (xb,) = extra
        a = jnp.abs(xb)
        terms = []
        for gt, mt, st in parts:
            log_ratio, valid = _log_ratios(a, mt)
            terms.append(jnp.where(valid, gt * jnp.exp(_scaled(log_ratio, p - 1) - st), 0))
        return jnp.sign(xb) * functools.reduce(jnp.add, terms)

    return adjoint_map((g, m, shift), plans, sizes, spread, extras=(x,))


def grad_p(x, y, g, p, plans):
    """``sum over outputs of g * y/p * sum q^p log q`` with ``q = |x|/y``."""

    def per_output(parts, ranges):
        m, log_s = _log_sum(parts, p)
        total = jnp.zeros_like(m)
        for t in parts:
            log_ratio, valid = _log_ratios(jnp.abs(t), m)
            log_q = log_ratio - log_s / p
            term = jnp.exp(_scaled(log_ratio, p) - log_s) * log_q
            total = total + jnp.where(valid, term, 0)
        return block_of(g, plans, ranges) * block_of(y, plans, ranges) * total

    return jnp.sum(box_map(x, plans, per_output, 0)) / p

"""The seed homework's pooling answers (section 1.2), computed by the library.

Max pooling of the convolution output C with kernel 2 and stride 1 (the seed publishes
[[109, 92], [110, 85]]), average pooling, the identity ``lp_pool(p=1) == |S| * avg_pool`` and Lp
pooling for growing ``p`` approaching max pooling.
"""

import math

import jax.numpy as jnp
import numpy as np

from jaxconv import avg_pool, lp_pool
from jaxconv._demo.seed import _compare, _mark, _matrix

SEED_MAX_POOL = np.array([[109, 92], [110, 85]], np.float32)
WINDOW = (2, 2)
STRIDE = 1
P_VALUES = (1.0, 2.0, 4.0, 16.0, 64.0, math.inf)


def _p_label(p: float) -> str:
    return "inf" if math.isinf(p) else f"{p:g}"


def _lp_table(c, max_pooled) -> dict:
    """lp_pool of ``c`` for every p in P_VALUES and its largest distance from max pooling."""
    rows = []
    for p in P_VALUES:
        y = np.asarray(lp_pool(c, p, WINDOW, STRIDE)[..., 0], np.float64)
        rows.append((p, y, float(np.max(np.abs(y - max_pooled)))))
    print(f"Lp pooling of C (window {WINDOW}, stride {STRIDE}) approaching max pooling:")
    print(f"    {'p':>5}   {'values (row-major)':<36}  max |lp - max|")
    for p, y, gap in rows:
        values = "  ".join(f"{v:8.3f}" for v in y.ravel())
        print(f"    {_p_label(p):>5}   {values:<36}  {gap:10.4f}")
    return {
        "p": [p for p, _, _ in rows],
        "lp": [y.tolist() for _, y, _ in rows],
        "gap_to_max": [gap for _, _, gap in rows],
    }


def pooling_walkthrough(c) -> dict:
    """Print the seed's pooling answers for the 3x3 convolution output ``c``; return the data.

    Returns:
      A dict with the max-pooled, average-pooled and Lp-pooled (``p`` in :data:`P_VALUES`)
      values of ``c`` (window 2, stride 1) and each Lp result's largest distance from max
      pooling, for plotting.
    """
    from jaxconv import max_pool

    c = jnp.asarray(c, jnp.float32)[..., None]  # (H, W, C=1), channels_last, no batch axes
    max_pooled = np.asarray(max_pool(c, WINDOW, STRIDE)[..., 0], np.float64)
    _compare("max-pool of C (kernel 2, stride 1)", max_pooled, SEED_MAX_POOL)
    avg = np.asarray(avg_pool(c, WINDOW, STRIDE)[..., 0], np.float64)
    _matrix("avg-pool of C (kernel 2, stride 1)", avg)
    size = math.prod(WINDOW)
    lp1 = np.asarray(lp_pool(c, 1.0, WINDOW, STRIDE)[..., 0], np.float64)
    ok = np.allclose(lp1, size * avg, rtol=1e-6)
    print(f"lp_pool(C, p=1) == |S| * avg_pool(C) with |S| = {size}  [{_mark(ok)}]")
    _matrix("    lp_pool(C, p=1)", lp1)
    table = _lp_table(c, max_pooled)
    return {
        "max_pool": max_pooled.tolist(),
        "seed_max_pool": SEED_MAX_POOL.tolist(),
        "avg_pool": avg.tolist(),
        "window_size": size,
        "identity_p1_holds": bool(ok),
        **table,
    }

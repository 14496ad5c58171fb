"""Shared by the numerical edge-case tests: the 16-bit float dtypes, and the jaxconv op of a
name (the test is skipped where jaxconv lacks it)."""

import jax.numpy as jnp
import pytest

import jaxconv

HALF_DTYPES = [jnp.float16, jnp.bfloat16]


def op(name):
    fn = getattr(jaxconv, name, None)
    if fn is None:
        pytest.skip(f"jaxconv.{name} is not available")
    return fn

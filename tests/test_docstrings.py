"""Every docstring example runs and prints what it shows, under JAX's defaults (32-bit
types, standard dtype promotion), as a user runs it."""

import doctest
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
import jaxconv._src

MODULES = ["jaxconv", "jaxconv.linen", "jaxconv.nnx"] + [
    f"jaxconv._src.{m.name}" for m in pkgutil.iter_modules(jaxconv._src.__path__)
]
PUBLIC = {name: getattr(jaxconv, name) for name in jaxconv.__all__}


def _examples(name):
    module = importlib.import_module(name)
    globs = {**PUBLIC, **vars(module), "jax": jax, "jnp": jnp, "np": np, "jaxconv": jaxconv}
    return [t for t in doctest.DocTestFinder().find(module, name, globs=globs) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        for test in _examples(name):
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_every_public_function_has_an_example():
    documented = {t.name.rsplit(".", 1)[-1] for name in MODULES for t in _examples(name)}
    assert set(jaxconv.__all__) <= documented, set(jaxconv.__all__) - documented

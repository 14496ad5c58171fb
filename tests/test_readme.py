"""The README's example runs and gives the shapes its comments state."""

import pathlib
import re

import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    text = README.read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["y"].shape == (8, 32, 32, 32)
    assert scope["p"].shape == (8, 16, 16, 32)
    assert scope["u"].shape == (8, 32, 32, 32)
    assert scope["a"].shape == (8, 7, 32, 32)
    assert scope["f"].shape == (8, 16, 16, 32)
    assert scope["idx"].dtype == jnp.int32

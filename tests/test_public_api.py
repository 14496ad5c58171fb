"""The public surface: every name in ``jaxconv.__all__`` imports and is documented; the Flax
modules import."""

import importlib
import inspect
import re
import subprocess
import sys

import pytest

import jaxconv

NAMES = list(jaxconv.__all__)
ARITHMETIC = {"conv_output_size", "conv_transpose_output_size"}


def test_all_is_unique_and_complete():
    assert len(NAMES) == len(set(NAMES))
    public = {
        name
        for name, value in vars(jaxconv).items()
        if not name.startswith("_") and callable(value) and not inspect.ismodule(value)
    }
    assert public <= set(NAMES), f"public but not in __all__: {public - set(NAMES)}"


@pytest.mark.parametrize("name", NAMES)
def test_importable_by_name(name):
    namespace = {}
    exec(f"from jaxconv import {name}", namespace)
    assert namespace[name] is getattr(jaxconv, name)


@pytest.mark.parametrize("name", NAMES)
def test_documented_with_an_example(name):
    doc = inspect.getdoc(getattr(jaxconv, name))
    assert doc, f"{name} has no docstring"
    assert ">>> " in doc, f"{name}: docstring has no example"
    assert re.search(r"\bArgs:|\bReturns:", doc) or name in ARITHMETIC, f"{name}: no Args section"


@pytest.mark.parametrize("name", sorted(set(NAMES) - ARITHMETIC))
def test_documents_its_transformations(name):
    doc = " ".join(inspect.getdoc(getattr(jaxconv, name)).split())
    assert re.search(r"Transformations:|Supports jit", doc), f"{name}: no transformations note"
    for transform in ("jit", "vmap", "grad"):
        assert transform in doc, f"{name}: the transformations note does not mention {transform}"
    assert "jvp" in doc, f"{name}: says nothing about forward mode (jvp)"


@pytest.mark.parametrize("name", sorted(set(NAMES) - ARITHMETIC))
def test_signature_is_typed_and_keyword_friendly(name):
    sig = inspect.signature(getattr(jaxconv, name))
    params = list(sig.parameters.values())
    assert params[0].annotation is not inspect.Parameter.empty, f"{name}: first argument untyped"
    assert "data_format" in sig.parameters
    assert sig.parameters["data_format"].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["data_format"].default == "channels_last"


@pytest.mark.parametrize("module", ["jaxconv.linen", "jaxconv.nnx"])
def test_flax_modules_import(module):
    mod = importlib.import_module(module)
    expected = [
        "Conv",
        "ConvTranspose",
        "MaxPool",
        "AvgPool",
        "LPPool",
        "AdaptiveAvgPool",
        "AdaptiveMaxPool",
        "FractionalMaxPool",
    ]
    missing = [name for name in expected if not hasattr(mod, name)]
    assert not missing, f"{module} lacks {missing}"
    for name in expected:
        assert inspect.getdoc(getattr(mod, name)), f"{module}.{name} has no docstring"


def test_core_import_needs_no_optional_package():
    """``import jaxconv`` loads neither Flax (the ``flax`` extra) nor the test oracles."""
    probe = (
        "import sys, jaxconv; "
        "loaded = {m.split('.')[0] for m in sys.modules}; "
        "print(sorted(loaded & {'flax', 'optax', 'torch', 'equinox'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", jaxconv.__version__)

"""Random streams of the ``flax.nnx`` modules: the parameter stream and fractional pooling's keys.

Imported by :mod:`jaxconv.nnx` only, so jaxconv itself does not need Flax.
"""

import jax
from flax import nnx


def rng_stream(fname: str, rngs: nnx.Rngs, name: str) -> nnx.RngStream:
    """``rngs[name]`` (Flax falls back to the ``default`` stream), or a ValueError."""
    try:
        return rngs[name]
    except KeyError:
        raise ValueError(
            f"{fname}: `rngs` must have a `{name}` stream (or a default one), got an nnx.Rngs "
            "without either."
        ) from None


def kept_stream(fname: str, rngs, collection: str):
    """The stream a module keeps: a fork of ``rngs[collection]`` (or of the given stream)."""
    if rngs is None:
        return None
    if isinstance(rngs, nnx.Rngs):
        return rng_stream(fname, rngs, collection).fork()
    if isinstance(rngs, nnx.RngStream):
        return rngs.fork()
    raise TypeError(
        f"{fname}: `rngs` must be an nnx.Rngs, an nnx.RngStream or None, got {type(rngs).__name__}."
    )


def draw_key(fname: str, given, kept, collection: str) -> jax.Array:
    """A fresh key from the call's ``rngs`` (Rngs, stream or key), else from the kept stream."""
    source = kept if given is None else given
    if source is None:
        raise ValueError(
            f"{fname}: random pooling needs `rngs` (in the constructor or the call), or "
            "deterministic=True; got neither."
        )
    if isinstance(source, nnx.Rngs):
        return rng_stream(fname, source, collection)()
    if isinstance(source, nnx.RngStream):
        return source()
    if isinstance(source, jax.Array):
        return source
    raise TypeError(
        f"{fname}: `rngs` must be an nnx.Rngs, an nnx.RngStream or a key array, "
        f"got {type(source).__name__}."
    )

"""Linear maps as JAX primitives with a transpose of our choosing.

A ``jax.custom_vjp`` sets a fast adjoint but has no forward mode and no ``linear_transpose``;
a ``jax.custom_jvp`` keeps them but leaves the adjoint to JAX's transpose of the tangent, which
for slices and gathers is padded copies and scatters (slow on CPU). A linear map ``A`` and its
adjoint ``A^T`` as two primitives, each the other's transpose and its own tangent, have both:
reverse mode runs ``A^T``'s own code, forward mode ``A``'s, at every order. Each primitive is
lowered through its Python implementation (JAX's own ops) on every platform, and vmap moves the
mapped axis to the front, which every op here accepts as one more batch axis.

A primitive is linear in its first operand; further operands (e.g. the winners' positions of
max pooling) are data the map reads, with no derivative, handed unchanged to its adjoint.
"""

import functools
import inspect
from collections.abc import Callable

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


def _batched(primitive, lead, args, dims, **params):
    """The mapped axis moved to the front; unmapped data broadcast along it (``None``)."""
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    moved = [
        jax.numpy.broadcast_to(a, (size, *a.shape)) if d is None else jax.numpy.moveaxis(a, d, 0)
        for a, d in zip(args, dims, strict=True)
    ]
    return primitive.bind(*moved, **lead(params)), 0


def _jvp(primitive, primals, tangents, **params):
    """Linear in the first operand: the tangent is the map of its tangent."""
    tangent = ad.instantiate_zeros(tangents[0])
    out = primitive.bind(*primals, **params)
    return out, primitive.bind(tangent, *primals[1:], **params)


def linear_primitive(name: str, impl: Callable, shape: Callable, lead: Callable) -> Primitive:
    """A primitive computing ``impl(x, *data, **params)``, linear in ``x``; ``shape(in_shape,
    **params)`` gives its result's shape and ``lead(params)`` the params of the same map on
    arrays with one more leading axis. Its transpose is set by :func:`adjoint_pair`."""
    primitive = Primitive(name)

    def impl_in_dtype(x, *data, **params):  # the abstract value's dtype, never weak-typed
        return impl(x, *data, **params).astype(x.dtype)

    impl_in_dtype.__signature__ = inspect.signature(impl)
    keywords = inspect.signature(impl).parameters.values()
    static = tuple(k.name for k in keywords if k.kind is inspect.Parameter.KEYWORD_ONLY)
    primitive.def_impl(jax.jit(impl_in_dtype, static_argnames=static))
    primitive.def_abstract_eval(
        lambda x, *data, **params: x.update(shape=shape(x.shape, **params), weak_type=False)
    )
    mlir.register_lowering(primitive, mlir.lower_fun(impl_in_dtype, multiple_results=False))
    batching.primitive_batchers[primitive] = functools.partial(_batched, primitive, lead)
    ad.primitive_jvps[primitive] = functools.partial(_jvp, primitive)
    return primitive


def _transpose(adjoint, g, _x, *data, **params):
    if type(g) is ad.Zero:
        return [None] * (1 + len(data))
    return [adjoint.bind(g, *data, **params), *([None] * len(data))]


def adjoint_pair(forward: Primitive, adjoint: Primitive) -> None:
    """Make ``forward`` and ``adjoint`` (same params and data) each the other's transpose."""
    ad.primitive_transposes[forward] = functools.partial(_transpose, adjoint)
    ad.primitive_transposes[adjoint] = functools.partial(_transpose, forward)


def unsigned_zeros(x):
    """``x`` with ``-0.0`` turned into ``+0.0``."""
    return jax.numpy.where(x == 0, jax.numpy.zeros((), x.dtype), x)


_keep_p = linear_primitive("jaxconv_keep", lambda x: x, lambda shape: shape, lambda params: params)
adjoint_pair(
    _keep_p,
    linear_primitive("jaxconv_unsigned_zeros", unsigned_zeros, lambda s: s, lambda p: p),
)


def unsigned_zero_cotangent(t):
    """``t`` itself, whose cotangent turns ``-0.0`` into ``+0.0``: PyTorch's backward adds
    cotangents to zeros, so its gradients never carry a ``-0.0`` that a pick's transpose (a
    select of the cotangent) would pass on."""
    return _keep_p.bind(t)

"""Linear maps as JAX primitives with a transpose of our choosing.

A ``jax.custom_vjp`` sets a fast adjoint but has no forward mode and no ``linear_transpose``;
a ``jax.custom_jvp`` keeps them but leaves the adjoint to JAX's transpose of the tangent, which
for slices and gathers is padded copies and scatters (slow on CPU). A linear map ``A`` and its
adjoint ``A^T`` as two primitives, each the other's transpose and its own tangent, have both:
reverse mode runs ``A^T``'s own code, forward mode ``A``'s, at every order. Each primitive is
lowered through its Python implementation (JAX's own ops) on every platform, and vmap moves the
mapped axis to the front, which every op here accepts as one more batch axis.
"""

import functools
import inspect
from collections.abc import Callable

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


def _batched(primitive, lead, args, dims, **params):
    x = jax.numpy.moveaxis(args[0], dims[0], 0)
    return primitive.bind(x, **lead(params)), 0


def linear_primitive(name: str, impl: Callable, shape: Callable, lead: Callable) -> Primitive:
    """A primitive computing ``impl(x, **params)``, linear in ``x``; ``shape(in_shape,
    **params)`` gives its result's shape and ``lead(params)`` the params of the same map on an
    array with one more leading axis. Its transpose is set by :func:`adjoint_pair`."""
    primitive = Primitive(name)

    def impl_in_dtype(x, **params):  # the abstract value's dtype, never weak-typed
        return impl(x, **params).astype(x.dtype)

    impl_in_dtype.__signature__ = inspect.signature(impl)
    keywords = inspect.signature(impl).parameters.values()
    static = tuple(k.name for k in keywords if k.kind is inspect.Parameter.KEYWORD_ONLY)
    primitive.def_impl(jax.jit(impl_in_dtype, static_argnames=static))
    primitive.def_abstract_eval(
        lambda x, **params: x.update(shape=shape(x.shape, **params), weak_type=False)
    )
    mlir.register_lowering(primitive, mlir.lower_fun(impl_in_dtype, multiple_results=False))
    batching.primitive_batchers[primitive] = functools.partial(_batched, primitive, lead)
    return primitive


def adjoint_pair(forward: Primitive, adjoint: Primitive) -> None:
    """Make ``forward`` and ``adjoint`` (same params) each the other's transpose."""
    ad.deflinear2(forward, lambda g, _x, **params: [adjoint.bind(g, **params)])
    ad.deflinear2(adjoint, lambda g, _x, **params: [forward.bind(g, **params)])

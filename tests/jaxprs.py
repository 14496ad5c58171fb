"""Every equation of a jaxpr, those in nested jaxprs (custom rules, cond branches) too."""

from jax.extend.core import ClosedJaxpr, Jaxpr


def _subjaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, Jaxpr):
                yield v


def equations(jaxpr):
    """All equations of ``jaxpr`` (a Jaxpr or ClosedJaxpr), depth first."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _subjaxprs(eqn.params):
            yield from equations(sub)


def primitives(jaxpr, name):
    """The equations of primitive ``name`` anywhere in ``jaxpr``."""
    return [e for e in equations(jaxpr) if e.primitive.name == name]

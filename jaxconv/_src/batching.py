"""Conditionals that stay conditionals under ``vmap``.

A ``lax.cond`` whose predicate ``vmap`` batches becomes a select of both branches, and JAX
guards the operands of that select with ``stop_gradient``. On a tangent inside a ``custom_jvp``
rule that guard is linear code reverse mode cannot transpose, so ``grad`` of a ``vmap`` fails.
The conditionals of the tangent paths here choose between equal results, or never take their
other branch, so one predicate for the whole batch serves as well as one per member.
"""

import jax
import jax.numpy as jnp


@jax.custom_batching.custom_vmap
def all_over_batch(flag: jax.Array) -> jax.Array:
    """``flag``, a bool scalar; under ``vmap`` the ``all`` of its batch, unbatched.

    Only for predicates whose conditional gives the same result either way, or whose other
    branch is never taken: a batch takes the true branch only where every member would.
    """
    return flag


@all_over_batch.def_vmap
def _all_over_batch_vmap(axis_size, in_batched, flag):
    del axis_size
    # again through all_over_batch: an enclosing vmap may batch the reduced flag too
    return all_over_batch(jnp.all(flag) if in_batched[0] else flag), False

"""The active mesh and rules, and sharding constraints on activations.

Inside `activate(mesh, rules)` the model's `constrain(x, axes)` calls pin
activations at layer boundaries to the mesh; outside it (single-device use,
tests, inference) they do nothing, so model code never needs to know
whether it runs sharded."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Mapping

import jax
from jax.sharding import Mesh, NamedSharding

from jaxkit.sharding.rules import MeshAxes, logical_to_spec

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("jaxkit_sharding", default=None)

# The residual stream [batch, length, embed] between layers.
RESIDUAL = ("batch", "length", "act_embed")


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Mapping[str, MeshAxes]):
    """Make `mesh` jax's current mesh and `rules` the rules `constrain` uses."""
    token = _ACTIVE.set((mesh, dict(rules)))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    current = _ACTIVE.get()
    return None if current is None else current[0]


def constrain(x: jax.Array, logical_axes) -> jax.Array:
    """with_sharding_constraint by logical axis names; identity when no mesh is active."""
    current = _ACTIVE.get()
    if current is None:
        return x
    mesh, rules = current
    spec = logical_to_spec(logical_axes, rules, what=f"activation {tuple(logical_axes)}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

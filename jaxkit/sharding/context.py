"""The active mesh and rules, sharding constraints on activations, and
per-shard execution of kernels XLA cannot partition.

Inside `activate(mesh, rules)` the model's `constrain(x, axes)` calls pin
activations at layer boundaries to the mesh and `per_shard(fn, ...)` runs fn
on each device's shard; outside it (single-device use, tests, inference)
both do nothing, so model code never needs to know whether it runs sharded."""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Mapping

import jax
from jax.sharding import Mesh, NamedSharding

from jaxkit.sharding.rules import MeshAxes, logical_to_spec, mesh_axes

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


def active() -> tuple[Mesh, dict[str, MeshAxes]] | None:
    """(mesh, rules) inside activate(), None outside it."""
    return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes) -> jax.Array:
    """with_sharding_constraint by logical axis names; identity when no mesh is active."""
    current = _ACTIVE.get()
    if current is None:
        return x
    mesh, rules = current
    spec = logical_to_spec(logical_axes, rules, what=f"activation {tuple(logical_axes)}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _parts(mesh: Mesh, rules, name: str) -> int:
    return math.prod(mesh.shape[a] for a in mesh_axes(name, rules, mesh))


def per_shard(fn: Callable, in_axes, out_axes) -> Callable:
    """fn(*arrays) -> array, run on each device's shard (jax.shard_map) while
    a mesh is active, and as it is otherwise. For computations XLA cannot
    partition, e.g. Pallas kernels, which it would run whole on every device.

    in_axes: a tuple of logical names (None: not split) per argument; None
    arguments pass through. out_axes: the logical names of the result. A
    logical axis is split only if every dimension carrying it divides its
    mesh axes (e.g. query and key/value heads both, for grouped-query
    attention); otherwise those dimensions stay whole on every device."""

    def wrapped(*args):
        current = _ACTIVE.get()
        if current is None:
            return fn(*args)
        mesh, rules = current
        whole = {name for arg, axes in zip(args, in_axes) if arg is not None
                 for size, name in zip(arg.shape, axes)
                 if name is not None and size % _parts(mesh, rules, name)}
        rules = {**rules, **{name: None for name in whole}}
        present = [i for i, arg in enumerate(args) if arg is not None]

        def local(*arrays):
            full = list(args)
            for i, a in zip(present, arrays):
                full[i] = a
            return fn(*full)

        return jax.shard_map(
            local, mesh=mesh, check_vma=False,
            in_specs=tuple(logical_to_spec(in_axes[i], rules) for i in present),
            out_specs=logical_to_spec(out_axes, rules))(*(args[i] for i in present))

    return wrapped

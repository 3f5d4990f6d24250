"""Shardings for the train state: parameters from their logical axes, the
optimizer state from the parameters it mirrors, everything else replicated."""
from __future__ import annotations

from typing import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxkit.config import ConfigError
from jaxkit.sharding.rules import MeshAxes, check_divisible, logical_to_spec


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def path_str(path) -> str:
    """'blocks.0.attn.q.kernel' for a jax key path."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts)


def variable_sharding(path: str, var: nnx.Variable, mesh: Mesh, rules: Mapping[str, MeshAxes],
                      *, required: bool) -> NamedSharding:
    """The sharding a variable's logical_axes metadata asks for, after checking
    that every split dimension divides evenly. Without metadata: an error when
    `required` (parameters), else replicated (e.g. counters, router statistics)."""
    axes = var.get_metadata().get("logical_axes")
    shape = var.get_value().shape
    if axes is None:
        if required:
            raise ConfigError(f"parameter {path} (shape {tuple(shape)}) has no logical_axes "
                              "metadata; create it with jaxkit.layers.linear.param or "
                              "nnx.Param(..., logical_axes=(...))")
        return NamedSharding(mesh, PartitionSpec())
    if len(axes) != len(shape):
        raise ConfigError(f"{path}: logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    what = f"parameter {path}" if required else f"model state {path}"
    spec = logical_to_spec(axes, rules, what=what)
    check_divisible(shape, spec, mesh, what=what, logical_axes=axes)
    return NamedSharding(mesh, spec)


def variable_shardings(tree, mesh: Mesh, rules, *, required: bool):
    """A tree like `tree` (an nnx.State) with a NamedSharding for each variable."""
    return jax.tree_util.tree_map_with_path(
        lambda p, v: variable_sharding(path_str(p), v, mesh, rules, required=required),
        tree, is_leaf=_is_variable)


def shardings_like_params(tree, params, param_shardings, mesh: Mesh):
    """Shardings for a tree that embeds copies of the parameter tree (optax
    state: moments under .mu, .nu, ...): a leaf whose path ends with a
    parameter's path and has that parameter's shape gets its sharding; other
    leaves (step counts, factored statistics) are replicated."""
    by_path = {}
    flat_params = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]
    flat_sh = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, var), sharding in zip(flat_params, flat_sh, strict=True):
        by_path[tuple(path)] = (var.get_value().shape, sharding)
    longest = max((len(p) for p in by_path), default=0)
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        shape = (leaf.get_value() if _is_variable(leaf) else leaf).shape
        for n in range(min(len(path), longest), 0, -1):
            match = by_path.get(tuple(path[-n:]))
            if match is not None and match[0] == shape:
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree, is_leaf=_is_variable)


def train_state_shardings(state: dict, mesh: Mesh, rules) -> dict:
    """Shardings for {params, opt_state, model_state, step}, as a tree prefix
    of `state` (concrete or abstract: jax.eval_shape output)."""
    params = variable_shardings(state["params"], mesh, rules, required=True)
    return dict(params=params,
                opt_state=shardings_like_params(state["opt_state"], state["params"], params, mesh),
                model_state=variable_shardings(state["model_state"], mesh, rules, required=False),
                step=NamedSharding(mesh, PartitionSpec()))


def abstract_state(tree, shardings):
    """jax.ShapeDtypeStructs for `tree`'s arrays carrying `shardings` (one per
    array, as a tree prefix: e.g. one per nnx.Variable), same tree structure."""
    leaves, treedef = jax.tree.flatten(tree)
    targets = jax.tree.leaves(shardings)
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                              for x, s in zip(leaves, targets, strict=True)])

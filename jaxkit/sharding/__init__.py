"""Meshes, logical-axis sharding rules and sharded train state.

    mesh = make_mesh(cfg.mesh)                 # axes data, fsdp, expert, sequence, tensor
    rules = resolve_rules(cfg.mesh.rules)      # logical axis -> mesh axes
    with activate(mesh, rules):                # model activations get constrained
        ...
"""
from jaxkit.sharding.batch import GlobalBatcher, batch_sharding, check_batch
from jaxkit.sharding.context import RESIDUAL, activate, active, constrain, per_shard
from jaxkit.sharding.mesh import MESH_AXES, make_mesh, mesh_shape
from jaxkit.sharding.rules import (DEFAULT_RULES, check_divisible, logical_to_spec, mesh_axes,
                                  resolve_rules)
from jaxkit.sharding.state import (abstract_state, shardings_like_params, train_state_shardings,
                                   variable_shardings)

__all__ = ["DEFAULT_RULES", "abstract_state", "GlobalBatcher", "MESH_AXES", "RESIDUAL", "activate", "active",
           "batch_sharding", "check_batch", "check_divisible", "constrain", "logical_to_spec",
           "make_mesh", "mesh_axes", "mesh_shape", "per_shard", "resolve_rules",
           "shardings_like_params", "train_state_shardings", "variable_shardings"]

"""Logical-axis rules: which mesh axes each named array dimension is split over.

Parameters and activations name their dimensions (e.g. a query kernel is
("embed", "heads"), the residual stream ("batch", "length", "act_embed")).
The rules are data: a default table, overridden per run by mesh.rules.
The defaults give ZeRO-3 style FSDP (weights, and with them gradients and
optimizer state, split over fsdp along embed), Megatron tensor parallelism
(heads, kv_heads, mlp and vocab over tensor), expert parallelism (exp over
expert) and data parallelism of the batch over every non-model axis.
"""
from __future__ import annotations

import math
from typing import Mapping

from jax.sharding import Mesh, PartitionSpec

from jaxkit.config import ConfigError
from jaxkit.sharding.mesh import MESH_AXES

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: dict[str, MeshAxes] = {
    # parameter dimensions
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "exp": "expert",
    "layers": None,  # the stacked-layer axis of scan_layers
    # activation dimensions
    "batch": ("data", "fsdp", "expert"),
    "length": "sequence",
    "act_embed": None,
    "act_heads": "tensor",  # attention heads inside per-shard attention kernels
}


def _normalize(name: str, value) -> MeshAxes:
    if value is None:
        return None
    axes = (value,) if isinstance(value, str) else value
    if not isinstance(axes, (list, tuple)) or not all(isinstance(a, str) for a in axes):
        raise ConfigError(f"mesh.rules.{name}: expected a mesh axis name, a list of them or "
                          f"null, got {value!r}")
    for a in axes:
        if a not in MESH_AXES:
            raise ConfigError(f"mesh.rules.{name}: unknown mesh axis {a!r}; "
                              f"mesh axes are {list(MESH_AXES)}")
    if len(set(axes)) != len(axes):
        raise ConfigError(f"mesh.rules.{name}: mesh axis listed twice in {value!r}")
    return tuple(axes) if len(axes) > 1 else axes[0]


def resolve_rules(overrides: Mapping[str, object] | None = None) -> dict[str, MeshAxes]:
    """The default table updated with `overrides` (mesh.rules), validated."""
    rules = dict(DEFAULT_RULES)
    for name, value in (overrides or {}).items():
        rules[name] = _normalize(name, value)
    return rules


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical_axes, rules: Mapping[str, MeshAxes], *, what: str = "array"
                    ) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have the given logical names
    (None: a dimension that is never split)."""
    spec, used = [], {}
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ConfigError(f"{what}: logical axis {name!r} has no sharding rule; add "
                              f"mesh.rules.{name} (known: {sorted(rules)})")
        axes = _as_tuple(rules[name])
        for a in axes:
            if a in used:
                raise ConfigError(f"{what}: dims {used[a]} and {dim} (logical axes "
                                  f"{tuple(logical_axes)}) both map to mesh axis {a!r}; "
                                  f"a mesh axis can split only one dimension")
            used[a] = dim
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def mesh_axes(logical: str, rules: Mapping[str, MeshAxes], mesh) -> tuple[str, ...]:
    """The axes of `mesh` that split logical axis `logical` under `rules`:
    those of its mesh axes the mesh has with more than one device."""
    entry = logical_to_spec((logical,), rules, what=f"logical axis {logical!r}")[0]
    return tuple(a for a in _as_tuple(entry) if mesh.shape.get(a, 1) > 1)


def check_divisible(shape, spec: PartitionSpec, mesh: Mesh, *, what: str, logical_axes=None
                    ) -> None:
    """Raises ConfigError naming the array, dimension, size and mesh axes when
    a split dimension is not a multiple of its mesh axes' total size."""
    for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        axes = _as_tuple(entry)
        parts = math.prod(mesh.shape[a] for a in axes)
        if size % parts:
            name = f" (logical axis {logical_axes[dim]!r})" if logical_axes else ""
            sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
            raise ConfigError(f"{what}: dim {dim}{name} of size {size} is not divisible by mesh "
                              f"axes {sizes} ({parts} shards); change the model size, the mesh, "
                              f"or mesh.rules")

"""Device mesh from config: named axes data, fsdp, expert, sequence, tensor."""
from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

from jaxkit.config import ConfigError, MeshConfig

# Outermost first: the axes that communicate least (data: one gradient
# all-reduce per step) span hosts, tensor (collectives in every layer) stays
# innermost, on the devices with the fastest links.
MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 axis (if any) filled so that they use every device."""
    sizes = {a: getattr(cfg, a) for a in MESH_AXES}
    for axis, size in sizes.items():
        if size != -1 and size < 1:
            raise ConfigError(f"mesh.{axis} must be -1 or >= 1, got {size}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {fill}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    described = ", ".join(f"{a}={s}" for a, s in sizes.items() if s != 1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(f"mesh ({described}): the fixed axes use {fixed} devices, which does "
                              f"not divide the {num_devices} devices available")
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"mesh ({described or 'all axes 1'}) uses {fixed} devices but "
                          f"{num_devices} are available; set one axis to -1 to fill the rest")
    return sizes


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes).

    Axes are of type Auto: shardings are given on inputs, outputs and layer
    boundaries, and XLA propagates them through the rest of the program."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)

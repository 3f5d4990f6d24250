"""Turning a loaded model into a LoRA model, in place: its weights frozen,
adapters around the projections the config names."""
from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from jaxkit.config import LoRAConfig
from jaxkit.layers.linear import Linear
from jaxkit.lora.layer import Frozen, LoRALinear, LoRARng


def replace_attributes(model: nnx.Module, replace: Callable) -> int:
    """Sets each attribute of each module of `model` (the model included) to
    replace(name, value) where that is not None; returns how many were set."""
    count = 0
    for _, module in list(nnx.iter_modules(model)):
        for name, value in list(vars(module).items()):
            new = replace(name, value)
            if new is not None:
                setattr(module, name, new)
                count += 1
    return count


def retype(var: nnx.Variable, kind: type[nnx.Variable]) -> nnx.Variable:
    """The variable's value and metadata (logical axes) as a `kind`."""
    return kind(var.get_value(), **var.get_metadata())


def freeze(model: nnx.Module) -> int:
    """Makes every nnx.Param of the model Frozen; returns how many."""
    count = replace_attributes(
        model, lambda _, v: retype(v, Frozen) if isinstance(v, nnx.Param) else None)
    left = nnx.to_flat_state(nnx.state(model, nnx.Param))
    if left:
        raise ValueError(f"parameters held outside module attributes, not frozen: "
                         f"{['.'.join(map(str, path)) for path, _ in left]}")
    return count


def apply_lora(model: nnx.Module, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> int:
    """Wraps every Linear held under a name cfg.targets lists (attention's
    q, k, v, o; the SwiGLU MLP's gate, up, down) in a LoRALinear; returns how
    many. Freeze the model first: its Params would otherwise train too."""
    count = replace_attributes(
        model, lambda name, v: LoRALinear(v, cfg, rngs=rngs)
        if name in cfg.targets and isinstance(v, Linear) else None)
    if not count:
        raise ValueError(f"the model has no projection among lora.targets {list(cfg.targets)}")
    return count


def adapter_state(model_state: nnx.State) -> nnx.State:
    """The part of a LoRA model's non-parameter state that training changes
    (the adapters' dropout keys): with the adapters, what a checkpoint holds."""
    return nnx.filter_state(model_state, LoRARng)

"""The ``implementation=`` rule shared by every op.

Names (the same for every op; an op offers those its table holds):
  'xla'        the pure-jnp reference or XLA's own op; runs everywhere.
  'cudnn'      a cuDNN path of jax (GPU only).
  'ragged_dot' jax.lax.ragged_dot(_general). Runs everywhere, but only GPUs
               and TPUs lower it natively; elsewhere jax lowers it to a dense
               product over every group.
  'mosaic_gpu' our Mosaic GPU kernel: Hopper (sm_90) only, compiled only.
  'blockspec'  our portable BlockSpec kernel: compiled on a GPU (Pallas's
               Triton lowering), or run by Pallas's interpreter anywhere.
  'pallas'     our Pallas kernel: 'mosaic_gpu' where it takes the call, else
               'blockspec'.
  'auto'       the first name in the op's preference order that takes the
               call natively on this machine: Pallas kernels compiled, never
               interpreted, and 'ragged_dot' only where it is native. On a
               CPU that is 'xla'.

interpret (Pallas kernels only): True runs the kernel in the interpreter,
False compiles it, None interprets off GPU and compiles on one ('mosaic_gpu'
always compiles). 'auto' and the non-Pallas names take no interpret.

A named implementation that cannot take a call raises a one-line ValueError
naming it and the reason. Reasons come in this order: interpret, then the
op's own limits (its table's ``supports``; the same on every machine), then
the device. 'pallas' gives the reason of each kernel it tried.

Arguments (checked by every op before anything is traced or compiled; a bad
one raises a one-line TypeError or ValueError naming it and its value):
sizes, windows, tiles and block sizes are Python or NumPy ints (not bools,
not floats, even integral ones) and positive; arrays are jax or NumPy arrays
(NumPy ones are converted); Python lists and tuples are refused rather than
guessed at (a ragged list has no array form); interpret is a bool or None.
"""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import compat

NAMES = ("auto", "xla", "cudnn", "ragged_dot", "pallas", "mosaic_gpu", "blockspec")
PALLAS_KERNELS = ("mosaic_gpu", "blockspec")  # what 'pallas' tries, in this order
NATIVE_RAGGED_DOT = ("gpu", "tpu")

# supports(args) -> why the implementation cannot take a call with these
# arguments (args.interpret included), or None when it can.
Supports = Callable[[SimpleNamespace], "str | None"]


def takes_any(args) -> None:
    """supports() of an implementation without limits of its own."""
    del args


def default_interpret() -> bool:
    """What interpret=None means for a kernel that can be interpreted."""
    return compat.platform() != "gpu"


def check_size(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int: a Python or NumPy integer (no bool) >= minimum."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_sizes(name: str, value, count: int) -> tuple[int, ...]:
    """``value`` as a tuple of ``count`` positive ints (see check_size)."""
    if not isinstance(value, (tuple, list)) or len(value) != count:
        raise TypeError(f"{name} must be a tuple of {count} positive ints, got {value!r}")
    return tuple(check_size(f"{name}[{i}]", size) for i, size in enumerate(value))


def check_positive_real(name: str, value) -> float:
    """``value`` as a float: a finite, positive Python or NumPy real (no bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                    np.floating)):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def check_flag(name: str, value, optional: bool = False):
    """``value`` as a bool (None passes through when ``optional``)."""
    if optional and value is None:
        return None
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool{' or None' if optional else ''}, got {value!r}")
    return bool(value)


def check_dtype(name: str, value):
    """``value`` as a jnp.dtype (anything jnp.dtype takes)."""
    try:
        return jnp.dtype(value)
    except TypeError:
        raise TypeError(f"{name} must be a dtype, got {value!r}") from None


def as_array(name: str, value, integer: bool = False):
    """A jax array (a tracer under jit included) as it is, a NumPy array as a
    jax one; anything else (a nested list above all) is refused. ``integer``:
    the dtype must be an integer one (not bool)."""
    if not isinstance(value, (np.ndarray, jax.Array)):
        raise TypeError(f"{name} must be a jax or NumPy array, got {type(value).__name__} "
                        f"{_short(value)}")
    if integer and not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    return jnp.asarray(value) if isinstance(value, np.ndarray) else value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Choice(NamedTuple):
    """A resolved call."""
    name: str         # one of NAMES but 'auto' and 'pallas'
    interpret: bool   # True only for a Pallas kernel run by the interpreter


def _interpret(name: str, interpret: bool | None, auto: bool) -> tuple[bool, str | None]:
    """-> (the interpret setting ``name`` runs with, why it cannot)."""
    if name not in PALLAS_KERNELS:
        if interpret is None:
            return False, None
        return False, f"takes no interpret (interpret={interpret} applies to the Pallas kernels)"
    if interpret is None:
        interpret = name == "blockspec" and not auto and default_interpret()
    if interpret and name == "mosaic_gpu":
        return True, ("runs compiled only (interpret=True given); 'blockspec' is the kernel "
                      "that runs interpreted")
    return interpret, None


def _device_problem(name: str, interpret: bool, auto: bool) -> str | None:
    platform = compat.platform()
    if name == "cudnn" and platform != "gpu":
        return f"needs a GPU (backend is {platform!r})"
    if name == "mosaic_gpu" and not compat.is_hopper():
        return f"needs a Hopper (sm_90) GPU; this device is {compat.device_kind()!r}"
    if name == "blockspec" and not interpret and platform != "gpu":
        return f"compiled needs a GPU (backend is {platform!r}); pass interpret=True"
    if name == "ragged_dot" and auto and platform not in NATIVE_RAGGED_DOT:
        return f"not native on {platform!r} (lowered to a dense product over every group)"
    return None


@dataclasses.dataclass(frozen=True)
class Table:
    """One op's implementations: name -> supports(args), and the order in
    which 'auto' tries them."""
    op: str                          # how messages name the op
    supports: Mapping[str, Supports]
    preference: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Every accepted ``implementation=`` value, in NAMES order."""
        offered = set(self.supports) | {"auto"}
        if offered & set(PALLAS_KERNELS):
            offered.add("pallas")
        return tuple(n for n in NAMES if n in offered)

    def resolve(self, implementation: str, interpret: bool | None = None, **args) -> Choice:
        """The implementation that runs this call (see the module docstring);
        ``args`` are the op's arguments its supports() read."""
        check_flag("interpret", interpret, optional=True)
        if implementation not in self.names:
            raise ValueError(f"unknown {self.op} implementation {implementation!r}; choose one "
                             f"of {self.names}")
        if implementation == "auto":
            if interpret is not None:
                raise ValueError(f"interpret={interpret} applies to a named Pallas kernel "
                                 f"('pallas', 'mosaic_gpu', 'blockspec'), not to 'auto'")
            problems = []
            for name in self.preference:
                choice, problem = self._try(name, None, args, auto=True)
                if choice:
                    return choice
                problems.append(f"{name}: {problem}")
            raise ValueError(f"implementation='auto' finds no {self.op} implementation for this "
                             f"call: {'; '.join(problems)}")
        choice, problem = self._try(implementation, interpret, args, auto=False)
        if problem:
            raise ValueError(f"implementation={implementation!r} cannot run this {self.op}: "
                             f"{problem}")
        return choice

    def _try(self, name, interpret, args, *, auto) -> tuple[Choice | None, str | None]:
        if name == "pallas":
            problems = []
            for kernel in PALLAS_KERNELS:
                if kernel in self.supports:
                    choice, problem = self._try(kernel, interpret, args, auto=auto)
                    if choice:
                        return choice, None
                    problems.append(f"{kernel}: {problem}")
            return None, "; ".join(problems)
        runs_interpreted, problem = _interpret(name, interpret, auto)
        problem = (problem
                   or self.supports[name](SimpleNamespace(**args, interpret=runs_interpreted))
                   or _device_problem(name, runs_interpreted, auto))
        return (None, problem) if problem else (Choice(name, runs_interpreted), None)

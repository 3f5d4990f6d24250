"""Number formats: element types and the format registry.

A format is an element type (the low-bit numbers actually stored) plus how its
scales are shared and encoded:

* scalar formats (int8, int4, fp8_*): one fp32 scale per group, the group
  chosen by the user (tensor, channel/token, or blocks of ``block_size``);
* MX formats (OCP Microscaling v1.0): 32-element blocks along the contraction
  axis sharing a power-of-two E8M0 scale;
* NV formats (NVFP4 and its int4 analogue): 16-element blocks sharing an FP8
  E4M3 scale, times one fp32 scale for the whole tensor.

Pure Python: no array code here, so the config validator can import it cheaply.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Literal


@dataclasses.dataclass(frozen=True)
class Element:
    """A low-bit element type.

    Floats follow the OCP/IEEE layout (``ebits`` exponent bits with bias
    2**(ebits-1)-1, ``mbits`` mantissa bits, subnormals) and saturate at
    ``max``. Integers store codes in [qmin, qmax] meaning ``code * step``.
    """
    name: str
    kind: Literal["int", "float"]
    bits: int
    ebits: int = 0
    mbits: int = 0
    max_float: float = 0.0
    qmin: int = 0
    qmax: int = 0
    step: float = 1.0

    @property
    def max(self) -> float:
        """Largest representable magnitude."""
        return self.max_float if self.kind == "float" else self.qmax * self.step

    @property
    def min_exp(self) -> int:
        """Exponent of the smallest normal number (floats)."""
        return 2 - 2 ** (self.ebits - 1)

    @property
    def emax(self) -> int:
        """Exponent of the largest normal number: the OCP MX ``emax_elem``."""
        return math.floor(math.log2(self.max))


E4M3 = Element("e4m3", "float", 8, ebits=4, mbits=3, max_float=448.0)
E5M2 = Element("e5m2", "float", 8, ebits=5, mbits=2, max_float=57344.0)
E2M3 = Element("e2m3", "float", 6, ebits=2, mbits=3, max_float=7.5)
E3M2 = Element("e3m2", "float", 6, ebits=3, mbits=2, max_float=28.0)
E2M1 = Element("e2m1", "float", 4, ebits=2, mbits=1, max_float=6.0)
# Symmetric integer ranges drop the most negative code so that +-amax are
# both representable and zero stays exact.
INT8 = Element("int8", "int", 8, qmin=-127, qmax=127)
UINT8 = Element("uint8", "int", 8, qmin=0, qmax=255)
INT4 = Element("int4", "int", 4, qmin=-7, qmax=7)
UINT4 = Element("uint4", "int", 4, qmin=0, qmax=15)
# MXINT8: 8-bit two's complement with an implicit 2**-6, values in (-2, 2).
MXINT8_ELEMENT = Element("int8_fixed6", "int", 8, qmin=-127, qmax=127, step=2.0 ** -6)


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    element: Element
    scale_type: Literal["fp32", "e8m0", "e4m3"] = "fp32"
    block_size: int | None = None  # fixed block along the contraction axis (MX/NV)
    tensor_scale: bool = False  # NV: an extra fp32 scale for the whole tensor
    asymmetric: bool = False  # integer codes with a zero point

    @property
    def is_block_format(self) -> bool:
        return self.block_size is not None


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("int8", INT8),
    Format("int8_asym", UINT8, asymmetric=True),
    Format("int4", INT4),
    Format("int4_asym", UINT4, asymmetric=True),
    Format("fp8_e4m3", E4M3),
    Format("fp8_e5m2", E5M2),
    Format("mxfp8", E4M3, "e8m0", 32),
    Format("mxfp8_e5m2", E5M2, "e8m0", 32),
    Format("mxint8", MXINT8_ELEMENT, "e8m0", 32),
    Format("mxfp6_e2m3", E2M3, "e8m0", 32),
    Format("mxfp6_e3m2", E3M2, "e8m0", 32),
    Format("mxfp4", E2M1, "e8m0", 32),
    Format("nvfp4", E2M1, "e4m3", 16, tensor_scale=True),
    Format("nvint4", INT4, "e4m3", 16, tensor_scale=True),
]}


def get_format(name: str | Format) -> Format:
    """The registered format called ``name``; ValueError listing valid names."""
    if isinstance(name, Format):
        return name
    if name in FORMATS:
        return FORMATS[name]
    close = difflib.get_close_matches(str(name), list(FORMATS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown quantization format {name!r}{hint}; valid formats: "
                     f"{', '.join(FORMATS)}")

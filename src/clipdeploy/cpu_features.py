"""What the CPU can do, read cheaply (no heavy import): the instruction-set flags the backends' rules need."""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["flags", "has_vnni"]

# Any of these gives int8 dot products without the 16-bit saturation of AVX2's VPMADDUBSW.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.lru_cache(maxsize=1)
def flags() -> frozenset[str]:
    """The CPU flags Linux reports in /proc/cpuinfo; empty where it cannot be read (other systems)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def has_vnni() -> bool:
    """Whether the CPU has an int8 dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool(VNNI_FLAGS & flags())

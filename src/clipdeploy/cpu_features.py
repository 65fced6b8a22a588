"""What the CPU can do, read cheaply (no heavy import): the instruction-set flags the backends' rules need."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

__all__ = ["flags", "has_vnni", "has_bf16", "missing", "VNNI_FLAGS", "BF16_FLAGS"]

CPUINFO = Path("/proc/cpuinfo")  # Linux; elsewhere flags() is empty and every feature reads as missing

# Any of these gives int8 dot products without the 16-bit saturation of AVX2's VPMADDUBSW.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# Any of these gives native bf16 dot products (VDPBF16PS, or AMX tiles): what OpenVINO's bf16 needs.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def flags() -> frozenset[str]:
    """The CPU flags Linux reports in /proc/cpuinfo; empty where it cannot be read (other systems)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def has_vnni() -> bool:
    """Whether the CPU has an int8 dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool(VNNI_FLAGS & flags())


def has_bf16() -> bool:
    """Whether the CPU has native bf16 arithmetic (AVX512_BF16 or AMX-BF16)."""
    return not missing(BF16_FLAGS)


def missing(any_of: Iterable[str]) -> str | None:
    """None when the CPU has at least one of ``any_of``; else the missing features, in words."""
    wanted = tuple(any_of)
    if not wanted or set(wanted) & flags():
        return None
    return wanted[0] if len(wanted) == 1 else f"{', '.join(wanted[:-1])} or {wanted[-1]}"

"""The CPU-feature probe the backend rules read: VNNI is any of the int8 dot-product flags."""

from __future__ import annotations

import pytest

from clipdeploy import cpu_features


def test_vnni_is_any_int8_dot_product_flag(monkeypatch):
    for flags, want in (({"avx2"}, False), ({"avx2", "avx512_vnni"}, True), ({"avx_vnni"}, True),
                        ({"amx_int8"}, True), (set(), False)):
        monkeypatch.setattr(cpu_features, "flags", lambda f=flags: frozenset(f))
        assert cpu_features.has_vnni() is want, flags


def test_flags_are_read_from_this_machine():
    flags = cpu_features.flags()
    assert isinstance(flags, frozenset)
    assert all(" " not in f and f for f in flags)


_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 fma {extra}
bugs\t\t: sysret_ss_attrs
"""


@pytest.mark.parametrize("extra, bf16, vnni", [
    ("", False, False),
    ("avx512f avx512_vnni", False, True),
    ("avx512f avx512_vnni avx512_bf16", True, True),
    ("amx_tile amx_bf16 amx_int8", True, True),
])
def test_features_are_read_from_cpuinfo(tmp_path, monkeypatch, extra, bf16, vnni):
    fake = tmp_path / "cpuinfo"
    fake.write_text(_CPUINFO.format(extra=extra), encoding="utf-8")
    monkeypatch.setattr(cpu_features, "CPUINFO", fake)
    cpu_features.flags.cache_clear()
    try:
        assert "avx2" in cpu_features.flags() and "AuthenticAMD" not in cpu_features.flags()
        assert cpu_features.has_bf16() is bf16 and cpu_features.has_vnni() is vnni
        assert (cpu_features.missing(cpu_features.BF16_FLAGS) is None) is bf16
        if not bf16:
            assert cpu_features.missing(cpu_features.BF16_FLAGS) == "avx512_bf16 or amx_bf16"
    finally:
        cpu_features.flags.cache_clear()  # the next caller reads this machine again


def test_an_unreadable_cpuinfo_has_no_features(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_features, "CPUINFO", tmp_path / "absent")
    cpu_features.flags.cache_clear()
    try:
        assert cpu_features.flags() == frozenset() and not cpu_features.has_bf16()
        assert cpu_features.missing(()) is None  # nothing required: nothing missing
    finally:
        cpu_features.flags.cache_clear()

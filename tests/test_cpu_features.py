"""The CPU-feature probe the backend rules read: VNNI is any of the int8 dot-product flags."""

from __future__ import annotations

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

"""The public API is exactly `proxykit.__all__` (as httpx tests its own)."""

from __future__ import annotations

import proxykit


def test_all_names_are_exported_and_nothing_else_is_public() -> None:
    public = {name for name in vars(proxykit) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(proxykit, name)).__name__ == "module"}
    assert set(proxykit.__all__) == public - modules
    for name in proxykit.__all__:
        assert getattr(proxykit, name).__module__.startswith("proxykit.")

from __future__ import annotations

from tests.proxy.conftest import env, make_env

__all__ = ["env", "make_env"]

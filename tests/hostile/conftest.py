from __future__ import annotations

# The proxy tests' environment: the sidecar served in front of the mock upstream.
from tests.proxy.conftest import env, make_env

__all__ = ["env", "make_env"]

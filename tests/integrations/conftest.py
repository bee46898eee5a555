from __future__ import annotations

import os
from pathlib import Path

import pytest

# LiteLLM fetches its price list from the network at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """LiteLLM's proxy takes about 4 s to import, and every test of it is marked slow: the fast
    loop (`-m "not slow"`) does not import it at all."""
    fast_loop = config.getoption("markexpr", "").strip() == "not slow"
    return True if fast_loop and collection_path.name == "test_litellm.py" else None

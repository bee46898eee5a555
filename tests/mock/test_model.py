from __future__ import annotations

import pytest

from sidecar.mock import MockOptions


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="fail_rate"):
        MockOptions(fail_rate=1.5)
    with pytest.raises(ValueError, match="chunks"):
        MockOptions(chunks=-1)

"""What the benchmark harness needs from the machine."""

from __future__ import annotations

import shutil

import pytest

needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")

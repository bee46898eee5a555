"""What the mock upstream answers unless told otherwise."""

from __future__ import annotations

TEXT = "Hello from the mock upstream"


USAGE_HEADERS = {
    "x-mock-input-tokens": "100",
    "x-mock-output-tokens": "20",
    "x-mock-cached-tokens": "40",
    "x-mock-reasoning-tokens": "5",
}

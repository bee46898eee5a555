"""`sidecar` run as a process."""

from __future__ import annotations

import os


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(extra)
    return env

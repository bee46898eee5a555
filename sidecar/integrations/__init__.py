"""Callbacks that let an existing proxy call the sidecar's hooks (see docs/integrations.md)."""

from __future__ import annotations

from __future__ import annotations

from sidecar.mock.cli import main

raise SystemExit(main())

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.store.embedded import EmbeddedStoreError, embedded, socket_path
from sidecar.testing.redis_server import free_port


def test_a_deep_data_dir_gets_a_short_socket_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    store = embedded(deep)
    try:
        assert len(str(store.socket)) < 108
        assert store.data_dir == deep.resolve()
        assert embedded(deep).socket == store.socket, "every process finds the same socket"
    finally:
        store.socket.parent.rmdir()


def test_a_data_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    data.chmod(0o770)
    with pytest.raises(EmbeddedStoreError, match=r"writable by other users \(mode 770\)"):
        embedded(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_a_socket_dir_another_user_made_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    planted = socket_path(deep).parent  # made under /tmp by someone else, before the sidecar
    planted.mkdir(mode=0o700)
    try:
        os.chown(planted, 65534, 65534)
        with pytest.raises(EmbeddedStoreError, match="belongs to uid 65534"):
            embedded(deep)
    finally:
        planted.rmdir()


def test_a_socket_dir_that_is_a_link_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    planted = socket_path(deep).parent
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    planted.symlink_to(tmp_path / "elsewhere")
    try:
        with pytest.raises(EmbeddedStoreError, match="is not a directory"):
            embedded(deep)
    finally:
        planted.unlink()


def test_serve_refuses_a_data_dir_others_can_write(tmp_path: Path, data: Path) -> None:
    data.mkdir(mode=0o700)
    data.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve"], cwd=tmp_path, capture_output=True, text=True,
        env={**env, "SIDECAR_DATA_DIR": str(data), "SIDECAR_PORT": str(free_port())},
        timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{data} (the data dir) is writable by other users" in result.stderr
    assert not (data / "redis.sock").exists()

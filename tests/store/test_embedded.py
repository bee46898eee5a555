"""The embedded store's lifecycle: shared by the sidecars of one data dir, stopped by the last,
restarted when it dies, and never two on one data dir at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from sidecar.mock import MockServer, start_mock
from sidecar.store.embedded import EmbeddedStoreError, embedded, socket_path
from sidecar.store.embedded import process as embedded_module
from sidecar.testing.redis_server import free_port
from tests.support.auth import ADMIN_TOKEN, AUTH

# uvicorn re-raises the SIGTERM it handled once it has shut down.
STOPPED = {0, -signal.SIGTERM}


def store_pid(data: Path) -> int:
    return int((data / "store.pid").read_text())


def alive(pid: int) -> bool:
    """Running (a zombie, or a pid that is gone, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "data"
    yield data
    # A test that failed half-way may leave its store running: end it (it is this test's).
    with contextlib.suppress(OSError, ValueError):
        pid = store_pid(data)
        if alive(pid) and Path(f"/proc/{pid}/cwd").resolve() == data.resolve():
            os.kill(pid, signal.SIGKILL)


def starts_in_log(data: Path) -> list[tuple[int, str]]:
    """(pid, event) from the stores' own log, in order: "start" and "exit"."""
    events = []
    for line in (data / "redis.log").read_text().splitlines():
        pid = line.partition(":")[0]
        if "Redis is starting" in line:
            events.append((int(pid), "start"))
        elif "Redis is now ready to exit" in line:
            events.append((int(pid), "exit"))
    return events


# -- the store's directories ------------------------------------------------------------------


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


# -- one process's view: starting, sharing, waiting ---------------------------------------------


@pytest.fixture
def store_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="sidecar.store")
    return caplog


def logged(caplog: pytest.LogCaptureFixture, text: str) -> Callable[[], bool]:
    return lambda: any(text in record.getMessage() for record in list(caplog.records))


def sigterm_pending(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    pending = int(re.search(r"ShdPnd:\s*([0-9a-f]+)", status).group(1), 16)  # type: ignore[union-attr]
    return bool(pending & (1 << (signal.SIGTERM - 1)))


@pytest.mark.timeout(60)
def test_a_start_waits_while_the_last_user_stops_the_store(
    data: Path, store_log: pytest.LogCaptureFixture
) -> None:
    last = embedded(data)
    assert last.open(watch=False) is True
    with redis.Redis(unix_socket_path=str(last.socket)) as client:
        client.set("kept", "yes")
    old = store_pid(data)
    # A store slow to save on its way out: frozen, it stays on its way out until let go.
    os.kill(old, signal.SIGSTOP)
    closed: list[bool] = []
    closing = threading.Thread(target=lambda: closed.append(last.close()))
    new_user = embedded(data)
    opened: list[bool] = []
    opening = threading.Thread(target=lambda: opened.append(new_user.open(watch=False)))
    try:
        closing.start()
        wait_until(lambda: sigterm_pending(old), 10, "the last user did not stop the store")
        opening.start()
        wait_until(logged(store_log, "is stopping it; waiting"), 10, "the start did not wait")
        assert opening.is_alive()
    finally:
        os.kill(old, signal.SIGCONT)
    closing.join(timeout=30)
    opening.join(timeout=30)
    assert closed == [True]
    assert opened == [True], "the new user did not start a store of its own"
    new = store_pid(data)
    assert starts_in_log(data) == [(old, "start"), (old, "exit"), (new, "start")]
    with redis.Redis(unix_socket_path=str(new_user.socket)) as client:
        assert client.get("kept") == b"yes"
    assert new_user.close() is True
    assert not alive(new)


@pytest.mark.timeout(60)
def test_no_store_starts_while_a_process_holds_the_store_lock(
    data: Path, store_log: pytest.LogCaptureFixture
) -> None:
    first = embedded(data)
    first.open(watch=False)
    with redis.Redis(unix_socket_path=str(first.socket)) as client:
        client.set("kept", "yes")
    assert first.close() is True
    # What a store on its way out does (or a child it forked that is still writing): hold the
    # lock, and answer nothing.
    with subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys\n"
         "f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True)\n"
         "sys.stdin.read()", str(data / "store.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    ) as holder:  # fmt: skip
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == b"1\n"
        second = embedded(data)
        opened: list[bool] = []
        opening = threading.Thread(target=lambda: opened.append(second.open(watch=False)))
        opening.start()
        wait_until(logged(store_log, "is starting or stopping; waiting"), 10, "no wait")
        assert opening.is_alive()
        assert len(starts_in_log(data)) == 2, "a store started beside the lock's holder"
        holder.stdin.close()
    opening.join(timeout=30)
    assert opened == [True]
    with redis.Redis(unix_socket_path=str(second.socket)) as client:
        assert client.get("kept") == b"yes"
    assert second.close() is True


@pytest.mark.timeout(60)
def test_the_last_user_signals_only_the_process_holding_the_store_lock(
    data: Path, store_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = embedded(data)
    user.open(watch=False)
    pid = store_pid(data)
    # A stale pidfile whose number now belongs to another process, one with the lock file open.
    with subprocess.Popen(
        [sys.executable, "-c", "import sys; f = open(sys.argv[1]); sys.stdin.read()",
         str(data / "store.lock")],
        stdin=subprocess.PIPE,
    ) as bystander:  # fmt: skip
        (data / "store.pid").write_text(f"{bystander.pid}\n")
        monkeypatch.setattr(embedded_module, "PID_WAIT_S", 0.5)
        assert user.close() is False
        assert bystander.poll() is None, "a process that is not the store was signalled"
        assert alive(pid)
        assert logged(store_log, "embedded Redis left running: no redis-server holding")()
        bystander.kill()
    (data / "store.pid").write_text(f"{pid}\n")
    other = embedded(data)  # a sidecar that did not start the store, and leaves it last
    assert other.open(watch=False) is False
    assert other.close() is True
    wait_until(lambda: not alive(pid), 10, "not stopped")
    user.close()  # (reaps its child)


# -- sidecars: rolling restarts, a store that dies, several sidecars on one data dir -------------


class Sidecar:
    """`sidecar serve` on the embedded store of `data`, in front of `upstream`."""

    def __init__(
        self, tmp_path: Path, data: Path, upstream: str, *, drain_s: float = 10, workers: int = 1
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp_path / f"config-{self.port}.toml"
        config.write_text(
            f'[upstream]\nurl = "{upstream}"\n'
            f'[server]\ndata_dir = "{data}"\ndrain_s = {drain_s}\nworkers = {workers}\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self.log = tmp_path / f"sidecar-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "serve", "--config", str(config)],
                env={**env, "SIDECAR_PORT": str(self.port), "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def lines(self, text: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if text in line]

    async def get(self, path: str) -> httpx.Response | None:
        async with httpx.AsyncClient(base_url=self.url, headers=AUTH, timeout=5) as client:
            try:
                return await client.get(path)
            except httpx.TransportError:
                return None

    async def answers(self, path: str = "/readyz", *, within_s: float = 30) -> float:
        """Seconds until `path` answers 200."""
        started = time.monotonic()
        while (reply := await self.get(path)) is None or reply.status_code != 200:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() - started < within_s, f"{path}: {reply and reply.text}"
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    async def health(self) -> Any:
        reply = await self.get("/healthz")
        assert reply is not None and reply.status_code == 200
        return reply.json()["embedded_store"]

    async def exited(self, within_s: float = 30) -> int:
        deadline = time.monotonic() + within_s
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "still running"
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def sidecars(tmp_path: Path, data: Path) -> Iterator[Callable[..., Sidecar]]:
    started: list[Sidecar] = []

    def start(upstream: str = "http://127.0.0.1:9", **options: Any) -> Sidecar:
        sidecar = Sidecar(tmp_path, data, upstream, **options)
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        sidecar.kill()


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    server = await start_mock()
    yield server
    await server.close()


async def create(sidecar: Sidecar, external_id: str) -> None:
    async with httpx.AsyncClient(base_url=sidecar.url, headers=AUTH) as client:
        reply = await client.post("/v2/identities", json={"external_id": external_id})
        assert reply.status_code == 201, reply.text


async def keeps_answering(sidecar: Sidecar, external_id: str, for_s: float) -> None:
    until = time.monotonic() + for_s
    while True:
        ready = await sidecar.get("/readyz")
        assert ready is not None and ready.status_code == 200, ready and ready.text
        found = await sidecar.get(f"/v2/identities/{external_id}")
        assert found is not None and found.status_code == 200, found and found.text
        if time.monotonic() > until:
            return
        await asyncio.sleep(0.1)


@pytest.mark.timeout(90)
async def test_a_rolling_restart_keeps_the_store_of_the_new_process(
    data: Path, sidecars: Callable[..., Sidecar], mock: MockServer
) -> None:
    old = sidecars(mock.url, drain_s=60)
    await old.answers()
    await create(old, "written-before")
    # About ten seconds of stream to drain: the new process comes up well within it.
    slow = {"x-mock-chunks": "200", "x-mock-chunk-delay-ms": "50", "X-ORQ-IDENTITY-ID": "s"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with (
        httpx.AsyncClient(base_url=old.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=slow)
        as reply,
    ):  # fmt: skip
        assert reply.status_code == 200
        chunks = reply.aiter_raw()
        received = await anext(chunks)
        # Stopped, and the new process started at once, as a supervisor that does not wait does.
        old.proc.send_signal(signal.SIGTERM)
        new = sidecars(mock.url)
        await new.answers()
        assert old.proc.poll() is None, "the old process was not draining any more"
        assert new.lines("sharing the embedded Redis"), new.log.read_text()
        async for chunk in chunks:
            received += chunk
    assert received.count(b"data: ") > 200 and received.endswith(b"data: [DONE]\n\n")
    assert await old.exited() in STOPPED, old.log.read_text()
    assert old.lines("embedded Redis left running: other sidecars use it")
    assert not old.lines("embedded Redis stopped")
    await keeps_answering(new, "written-before", for_s=2)
    assert len({pid for pid, event in starts_in_log(data) if event == "start"}) == 1
    new.proc.send_signal(signal.SIGTERM)
    assert await new.exited() in STOPPED
    assert new.lines("embedded Redis stopped")
    assert not (data / "redis.sock").exists()


@pytest.mark.timeout(90)
async def test_a_killed_store_is_restarted_with_its_data(
    data: Path, sidecars: Callable[..., Sidecar]
) -> None:
    sidecar = sidecars(workers=2)  # the store is watched by `serve`, not by one worker
    await sidecar.answers()
    await create(sidecar, "survivor")
    assert await sidecar.health() == {"restarts": 0, "last_restart": None}
    killed = store_pid(data)
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: not alive(killed), 5, "not killed")
    took = await sidecar.answers("/v2/identities/survivor", within_s=10)
    assert took < 5, f"the API answered again only after {took:.1f} s"
    await keeps_answering(sidecar, "survivor", for_s=1)  # from every worker
    assert store_pid(data) != killed
    for _ in range(4):  # answered by either worker
        health = await sidecar.health()
        assert health["restarts"] == 1
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", health["last_restart"])
    warnings = sidecar.lines("restarted it")
    assert len(warnings) == 1 and '"level":"WARNING"' in warnings[0], warnings
    assert "was killed by SIGKILL" in warnings[0]
    sidecar.proc.send_signal(signal.SIGTERM)
    assert await sidecar.exited() in STOPPED
    assert sidecar.lines("embedded Redis stopped")


@pytest.mark.timeout(120)
async def test_sidecars_on_one_data_dir_share_one_store_until_the_last_leaves(
    data: Path, sidecars: Callable[..., Sidecar]
) -> None:
    first, second = sidecars(), sidecars()
    await first.answers()
    await second.answers()
    assert len(first.lines("started the embedded Redis") + second.lines("started the")) == 1
    await create(first, "shared")
    await keeps_answering(second, "shared", for_s=0)  # written through the other

    killed = store_pid(data)
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: not alive(killed), 5, "not killed")
    await first.answers("/v2/identities/shared", within_s=10)
    await second.answers("/v2/identities/shared", within_s=10)
    restarted = first.lines("restarted it") + second.lines("restarted it")
    assert len(restarted) == 1, "one sidecar restarts it, and only one"
    assert (await first.health())["restarts"] == (await second.health())["restarts"] == 1
    store = store_pid(data)

    first.proc.send_signal(signal.SIGTERM)
    assert await first.exited() in STOPPED
    assert first.lines("embedded Redis left running: other sidecars use it")
    await keeps_answering(second, "shared", for_s=1)
    assert alive(store)

    second.proc.send_signal(signal.SIGTERM)
    assert await second.exited() in STOPPED
    assert second.lines("embedded Redis stopped")
    assert not alive(store)
    assert not (data / "redis.sock").exists()

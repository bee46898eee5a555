"""The embedded store's lifecycle: shared by the sidecars of one data dir, stopped by the last,
kept through a rolling restart, and never two on one data dir at once."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from sidecar.mock import MockServer
from sidecar.store.embedded import embedded
from sidecar.store.embedded import process as embedded_module
from tests.support.embedded import (
    STOPPED,
    Sidecar,
    alive,
    create,
    keeps_answering,
    starts_in_log,
    store_pid,
    wait_until,
)


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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

    # The restarting sidecar logs just after the store is back: the other may answer first.
    def restarted() -> list[str]:
        return first.lines("restarted it") + second.lines("restarted it")

    wait_until(lambda: bool(restarted()), 5, "no sidecar logged the restart")
    assert len(restarted()) == 1, "one sidecar restarts it, and only one"
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

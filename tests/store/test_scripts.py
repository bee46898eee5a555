def test_commands_are_packed_as_the_client_packs_them() -> None:
    from redis.asyncio.connection import Connection

    from sidecar.store.scripts import _resp

    args: list[str | bytes | int] = [
        "EVALSHA",
        "abc",
        2,
        "k:{01J}:1",
        b"raw\r\nbytes",
        "r 10 60000 5 121 ",
        0,
        -3,
    ]
    (packed,) = Connection().pack_command(*args)
    assert _resp(list(args)) == packed

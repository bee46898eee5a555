"""Reading requests off a connection: httptools' callbacks, one RecordedRequest per request."""

from __future__ import annotations

from typing import Protocol

import httptools

from sidecar.mock.model import RecordedRequest

MAX_BODY_BYTES = 64 * 1024 * 1024

_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}


class Receiver(Protocol):
    @property
    def closing(self) -> bool:
        """True once no more requests are read or answered."""
        ...

    def received(
        self, request: RecordedRequest, keep_alive: bool, http10: bool, too_large: bool
    ) -> None: ...

    def expects_continue(self) -> None:
        """The request's headers asked for a 100 Continue before its body."""
        ...


class RequestReader:
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._expect = False
        self._controls = False
        self._body: list[bytes] = []
        self._body_size = 0

    def feed(self, data: bytes) -> None:
        """Raises httptools.HttpParserError on a malformed stream, and HttpParserUpgrade."""
        self._parser.feed_data(data)

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._controls = False
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        first = name[0] | 0x20 if name else 0  # ASCII lower case
        if first == 0x78:  # "x": perhaps an x-mock-* control
            self._controls = self._controls or name[:7].lower() == b"x-mock-"
        elif first == 0x65 and len(name) == 6 and name.lower() == b"expect":
            self._expect = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        if self._expect:
            self._expect = False
            self._receiver.expects_continue()

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size <= MAX_BODY_BYTES:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._receiver.closing:
            return
        url = self._url
        if not url.startswith(b"/"):  # absolute-form, as a forward proxy would send it
            parsed = httptools.parse_url(url)
            url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
        path, _, query = url.partition(b"?")
        too_large = self._body_size > MAX_BODY_BYTES
        method = self._parser.get_method()
        request = RecordedRequest.from_wire(
            _METHODS.get(method) or method.decode("latin-1"),
            path.decode("latin-1"),
            query.decode("latin-1"),
            self._headers,
            b"" if too_large else b"".join(self._body),
            self._controls,
        )
        keep_alive = self._parser.should_keep_alive()
        http10 = self._parser.get_http_version() == "1.0"
        self._receiver.received(request, keep_alive, http10, too_large)

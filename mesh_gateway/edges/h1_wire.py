"""HTTP/1.1 bytes for the h1 server: response heads and body framing, and a parsed request head put back on the
wire (for the connection handed to aiohttp on a WebSocket upgrade). Pure: no I/O."""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

from mesh_gateway.edges.http import RequestHead
from mesh_gateway.model import Response

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Framing is the server's business: whatever a response carries for these is replaced by what is actually sent.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_STATUS_LINES: dict[int, str] = {}


def _status_line(status: int) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {reason}\r\n"
    return line


class _Clock:
    """The Date header changes once a second; format it once a second."""

    second = -1
    line = ""

    @classmethod
    def date_line(cls) -> str:
        now = int(time.time())
        if now != cls.second:
            cls.second, cls.line = now, f"date: {formatdate(now, usegmt=True)}\r\n"
        return cls.line


class ResponseHead:
    """The status line and headers of one response, with how its body is framed."""

    __slots__ = ("chunked", "close_delimited", "has_body", "keep_alive", "prefix")

    def __init__(self, response: Response, method: str, protocol: str, keep_alive: bool) -> None:
        status = response.status
        # HEAD, 1xx, 204 and 304 never carry a body; a HEAD answer still says how long the body would be.
        self.has_body = not (method == "HEAD" or status < 200 or status == 204 or status == 304)
        self.chunked = self.close_delimited = False
        parts = [_status_line(status)]
        declared: str | None = None
        has_date = False
        for name, value in response.headers:
            lower = name if name.islower() else name.lower()
            if lower in _FRAMING:
                if lower == "content-length":
                    declared = value
                continue
            if lower == "date":
                has_date = True
            parts.append(f"{name}: {value}\r\n")
        length: str | None = None
        if not self.has_body:
            length = declared if method == "HEAD" and declared is not None and declared.isdigit() else None
        elif isinstance(response.body, bytes):
            length = str(len(response.body))
        elif declared is not None and declared.isdigit():
            length = declared
        elif protocol == "HTTP/1.1":
            self.chunked = True
        else:  # an HTTP/1.0 client and a body of unknown length: the end of the body is the end of the connection
            self.close_delimited = True
            keep_alive = False
        if length is not None:
            parts.append(f"content-length: {length}\r\n")
        elif self.chunked:
            parts.append("transfer-encoding: chunked\r\n")
        if not keep_alive:
            parts.append("connection: close\r\n")
        elif protocol == "HTTP/1.0":
            parts.append("connection: keep-alive\r\n")
        if not has_date:
            parts.append(_Clock.date_line())
        parts.append("\r\n")
        text = "".join(parts)
        try:
            self.prefix = text.encode("latin-1")
        except UnicodeEncodeError:  # a policy may add a header value outside latin-1: send its UTF-8 octets
            self.prefix = text.encode("utf-8")
        self.keep_alive = keep_alive

    def frame(self, chunk: bytes) -> bytes:
        """One piece of a streamed body as it goes on the wire; b"" ends the body."""
        if not self.chunked:
            return chunk
        if not chunk:
            return b"0\r\n\r\n"
        return b"%x\r\n%b\r\n" % (len(chunk), chunk)


def request_bytes(head: RequestHead, *, without: str | None = None) -> bytes:
    """A parsed request head as it was on the wire (header names lower-cased), less the field named `without`."""
    lines = [f"{head.method} {head.target} {head.protocol}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in head.fields if name != without]
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")

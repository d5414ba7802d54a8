"""The API's HTTP server: waitress, with guards that decide before the body is read.

Why waitress, extended here, and not gunicorn: waitress receives every connection on one asynchronous
loop and hands a request to a worker thread only once it is complete, so slow or stalled clients never
hold a worker thread (gunicorn's threaded worker reads the request head in a worker thread, with no head
timeout: a hundred slow clients stall it). What waitress lacks, this module adds through its own
extension points (``channel_class``, ``parser_class``, ``error_task_class``):

* **Refuse before reading.** As soon as a request head is complete, a declared body over the limit gets
  JSON 413, and a body sent without the right ``X-API-Key`` (when one is configured) gets JSON 401; the
  body is not read, ``Expect: 100-continue`` is not answered with 100, and the connection closes. A
  chunked body is counted as it streams and cut at the limit with the same 413.
* **Bounded memory.** A body being received lives in an anonymous memory map sized to its declared length
  (or the limit, for chunked bodies): pages are only committed as bytes arrive, never touch the disk, and
  go back to the operating system the moment the request ends or its connection closes. So buffered
  bodies take at most ``connection_limit x max_body`` bytes.
* **Timeouts.** A request head must be complete ``header_timeout`` seconds after its first byte (or after
  connecting), its body ``body_timeout`` seconds after the head; otherwise the client gets JSON 408 and
  the connection closes. Idle keep-alive connections close after ``idle_timeout``.
* **JSON at every status**: waitress' own errors (400 malformed HTTP, 413, 431 head too large, 501 unknown
  transfer coding, 500) are JSON bodies in the API's error shape.

After an early answer the server stops sending and discards (never stores) what the client still sends
for up to ``LINGER_S`` seconds, so that the client reads the answer instead of a connection reset.
"""
from __future__ import annotations

import functools
import io
import mmap
import socket
import time
from dataclasses import dataclass

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher
from waitress.utilities import Error

from mediscan.apps.api import key_matches
from mediscan.apps.errors import error_document, too_large_message, unauthorized_message, valid_request_id

__all__ = ["Guard", "make_server"]

#: waitress' ``outbuf_overflow``: an answer buffer above this size moves to a temporary file. No answer is
#: this large (a buffer holds at most one answer plus the 16 MB high-water mark), so none ever goes to disk.
NEVER_SPILL = 2**62
#: How long a refused client may keep sending (discarded) before the connection is closed.
LINGER_S = 2.0
_OPEN_PATHS = {("GET", "/health"), ("HEAD", "/health")}
# waitress' error classes -> the API's error codes
_CODES = {400: "bad_request", 401: "unauthorized", 408: "request_timeout", 413: "payload_too_large",
          431: "headers_too_large", 500: "internal_error", 501: "not_implemented"}


@dataclass(frozen=True)
class Guard:
    """The server layer's limits: body size, API key, timeouts (seconds), open connections."""

    max_body: int
    api_key: str | None = None
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    idle_timeout: int = 30
    connection_limit: int = 100


class Refusal(Error):
    """An answer the server layer gives itself: JSON in the API's error shape."""

    def __init__(self, code: int, reason: str, error_code: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.error_code = code, reason, error_code


def _json_response(error: Error, request, guard: Guard) -> tuple[str, list, bytes]:
    """Status line, headers and JSON body for any waitress error (ours or its own)."""
    rid = valid_request_id(request.headers.get("X_REQUEST_ID"))
    code = getattr(error, "error_code", None) or _CODES.get(error.code, "bad_request")
    message = error.body
    if error.code == 413 and code == "payload_too_large":
        message = too_large_message(guard.max_body)
    elif not isinstance(error, Refusal):
        message = f"{error.reason}: {error.body}."
    body = error_document(code, message, rid)
    return f"{error.code} {error.reason}", [("Content-Type", "application/json"), ("X-Request-ID", rid)], body


class MemoryBody:
    """A request body in an anonymous memory map: committed page by page, returned to the OS on close.

    Implements what waitress' receivers and request need from a buffer (``append``, ``__len__``,
    ``getfile``, ``close``).
    """

    def __init__(self, capacity: int):
        self._map = mmap.mmap(-1, max(capacity, 1))
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        end = self._size + len(data)
        if end > len(self._map):       # cannot happen: the parser stops at the limit first
            raise ValueError("request body over its buffer")
        self._map[self._size:end] = data
        self._size = end

    def getfile(self):
        return io.BufferedReader(_MapReader(self._map, self._size), 64 * 1024)

    def close(self) -> None:
        if not self._map.closed:
            try:
                self._map.close()
            except BufferError:        # a reader still holds a view; freed when it goes
                pass


class _MapReader(io.RawIOBase):
    def __init__(self, data: mmap.mmap, size: int):
        self._data, self._size, self._pos = data, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        buffer[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


class GuardedParser(HTTPRequestParser):
    """waitress' request parser, plus the decisions taken as soon as the head is complete."""

    def __init__(self, adj, guard: Guard):
        super().__init__(adj)
        self.guard = guard
        self.started = time.monotonic()
        self.head_done_at: float | None = None

    def received(self, data: bytes) -> int:
        in_head = not self.headers_finished
        consumed = super().received(data)
        if in_head and self.headers_finished:
            self.head_done_at = time.monotonic()
            if self.error is not None:        # refused by waitress (e.g. declared body over the limit):
                self.refuse(self.error)        # no "100 Continue", no body read
            elif self.body_rcv is not None:
                self._check_head()
        return consumed

    def _check_head(self) -> None:
        """Refuse a body the server will not take; else give it a memory-mapped buffer."""
        guard = self.guard
        if guard.api_key and (self.command, self.path) not in _OPEN_PATHS \
                and not key_matches(self.headers.get("X_API_KEY"), guard.api_key):
            self.refuse(Refusal(401, "Unauthorized", "unauthorized", unauthorized_message()))
            return
        # A chunked body is cut once its bytes on the wire pass the limit, checked after each read.
        capacity = guard.max_body + self.adj.recv_bytes if self.chunked else self.content_length
        self.body_rcv.buf = MemoryBody(capacity)

    def refuse(self, refusal: Error) -> None:
        """Complete this request as ``refusal`` without reading its body."""
        self.error, self.completed, self.expect_continue = refusal, True, False
        self.close()

    def close(self) -> None:
        if self.body_rcv is not None:
            self.body_rcv.getbuf().close()


class JsonErrorTask(ErrorTask):
    """waitress' error answer, as JSON in the API's shape; the connection closes after it."""

    def execute(self):
        status, headers, body = _json_response(self.request.error, self.request, self.channel.server.guard)
        self.status = status
        self.response_headers.extend(headers)
        self.set_close_on_finish()
        self.content_length = len(body)
        self.channel.linger = True
        self.write(body)


class GuardedChannel(HTTPChannel):
    """One client connection: waitress' channel plus head/body deadlines and a lingering close."""

    error_task_class = JsonErrorTask
    linger = False                    # set when an early answer was sent: discard input for a while
    draining_until: float | None = None

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map=map)
        self.parser_class = functools.partial(GuardedParser, guard=server.guard)
        self.opened = time.monotonic()
        self.had_data = False

    def received(self, data):
        self.had_data = self.had_data or bool(data)
        return super().received(data)

    def readable(self):
        return self.draining_until is not None or super().readable()

    def handle_read(self):
        if self.draining_until is None:
            return super().handle_read()
        try:
            data = self.socket.recv(64 * 1024)    # discarded: never buffered
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or time.monotonic() > self.draining_until:
            self.handle_close()

    def handle_close(self):
        """After an early answer: half-close and drain first; otherwise (and then) really close."""
        if self.linger and self.draining_until is None and self.connected and not self.total_outbufs_len:
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                self.will_close = self.close_when_flushed = False
                self.draining_until = time.monotonic() + LINGER_S
                return
        self._drop_partial_request()
        super().handle_close()

    def _drop_partial_request(self) -> None:
        with self.requests_lock:
            if self.request is not None:
                self.request.close()           # its memory goes back now, not when collected
                self.request = None

    def check_deadlines(self, now: float) -> None:
        """Called once a second from the server loop: enforce the head and body timeouts."""
        if self.draining_until is not None:
            if now > self.draining_until:
                self.will_close = True
            return
        if self.requests or self.will_close or self.close_when_flushed:
            return                            # being answered, or already on its way out
        guard, request = self.server.guard, self.request
        if request is None:
            if not self.had_data and now - self.opened > guard.header_timeout:
                self.will_close = True         # connected and never sent a byte: close without a word
        elif request.head_done_at is None and now - request.started > guard.header_timeout:
            self._time_out(request, "head (request line and headers)", guard.header_timeout)
        elif request.head_done_at is not None and now - request.head_done_at > guard.body_timeout:
            self._time_out(request, "body", guard.body_timeout)

    def _time_out(self, request, part: str, limit: float) -> None:
        """Answer JSON 408 from the loop thread (no task runs for this channel) and close."""
        refusal = Refusal(408, "Request Timeout", "request_timeout",
                          f"The request {part} did not arrive within {limit:g} s; the connection is closed. "
                          f"Send the whole request promptly, or retry on a faster link.")
        status, headers, body = _json_response(refusal, request, self.server.guard)
        head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        self._drop_partial_request()
        with self.outbuf_lock:
            self.outbufs[-1].append(head.encode("latin-1") + body)
            self.total_outbufs_len += len(head) + len(body)
        self.linger, self.close_when_flushed = True, True


class GuardedServer(TcpWSGIServer):
    """waitress' TCP server with :class:`GuardedChannel` connections and a once-a-second deadline check."""

    channel_class = GuardedChannel

    def __init__(self, application, guard: Guard, **kwargs):
        self.guard = guard
        super().__init__(application, **kwargs)

    def maintenance(self, now):
        super().maintenance(now)               # waitress' idle timeout (idle_timeout)
        monotonic = time.monotonic()
        for channel in list(self.active_channels.values()):
            channel.check_deadlines(monotonic)


def waitress_settings(guard: Guard, threads: int, host: str, port: int, ident: str) -> dict:
    """The waitress adjustments behind :class:`Guard`.

    Bodies live in :class:`MemoryBody`, never in waitress' own buffers; ``inbuf_overflow`` stays above the
    limit anyway so nothing can ever spill to a temporary file. Answers never spill either
    (``outbuf_overflow`` is :data:`NEVER_SPILL`): the app has built the whole answer in memory already, so a
    temporary file would save nothing and would write the patient's image (a base64 overlay) to disk.
    waitress counts its own listening socket and wake-up pipe against ``connection_limit``: two are added so
    that ``guard.connection_limit`` clients fit. poll() instead of select(): select() cannot watch more than
    1,024 sockets.
    """
    return {
        "host": host, "port": port, "threads": threads, "ident": ident,
        "max_request_body_size": guard.max_body + 1,      # waitress refuses at >= this
        "inbuf_overflow": guard.max_body + 1024 * 1024,
        "outbuf_overflow": NEVER_SPILL,
        "connection_limit": guard.connection_limit + 2,
        "channel_timeout": guard.idle_timeout,
        "cleanup_interval": 1,
        "asyncore_use_poll": True,
    }


def make_server(app, guard: Guard, *, threads: int, host: str = "127.0.0.1", port: int = 5000,
                ident: str = "MediScan"):
    """A ready-to-``run()`` server for ``app`` on every address ``host`` resolves to."""
    adj = Adjustments(**waitress_settings(guard, threads, host, port, ident))
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    socket_map: dict = {}
    servers = [GuardedServer(app, guard, map=socket_map, dispatcher=dispatcher, adj=adj, sockinfo=info)
               for info in adj.listen]
    if len(servers) == 1:
        return servers[0]
    listening = [(s.effective_host, s.effective_port) for s in servers]
    return MultiSocketServer(socket_map, adj, listening, dispatcher, log_info=servers[0].log_info)

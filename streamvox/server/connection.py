"""The HTTP connection as uvicorn's h11 protocol handles it, with what a public server needs beyond it.

- A small kernel send buffer on each connection, so that a client that stops reading blocks the server's writes
  within a second or two of audio (the pacing in EngineClient measures those writes) instead of after megabytes
  of an auto-tuned buffer.
- Read time-outs: a request (its headers and body) must arrive in whole within `read_timeout_s` of its first
  byte, with no silence longer than `read_idle_timeout_s`, or the connection is closed with a 408. uvicorn
  bounds only the idle time between requests, so a connection that sends half its headers, or a byte now and
  then (slowloris), or a short body, would otherwise be held for good. Once a request is read, a response may
  take as long as it streams; a WebSocket leaves this protocol at its upgrade.
"""

from __future__ import annotations

import json
import socket
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from streamvox.server.errors import ApiError, error_body

SEND_BUFFER_BYTES = 64 * 1024  # about 1.4 s of 24 kHz int16 audio: a fast link still moves megabytes a second
CHECK_S = 0.5  # how often a connection checks its read time-outs
READING = (h11.IDLE, h11.SEND_BODY)  # the client's states while a request is still arriving


def guarded_protocol(read_timeout_s: float, read_idle_timeout_s: float) -> type:
    class GuardedH11(H11Protocol):
        def connection_made(self, transport) -> None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            super().connection_made(transport)
            self._read_started_s = self._last_data_s = time.monotonic()
            self._is_upgraded = False
            self._check_handle = self.loop.call_later(CHECK_S, self._check)

        def data_received(self, data: bytes) -> None:
            self._last_data_s = time.monotonic()
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._read_started_s = self._last_data_s = time.monotonic()  # the next request's time starts now

        def handle_websocket_upgrade(self, event: h11.Request) -> None:
            self._is_upgraded = True
            super().handle_websocket_upgrade(event)

        def connection_lost(self, exc: Exception | None) -> None:
            self._check_handle.cancel()
            super().connection_lost(exc)

        def _check(self) -> None:
            if self._is_upgraded or self.transport.is_closing():
                return
            now = time.monotonic()
            if self.conn.their_state in READING and (now - self._read_started_s > read_timeout_s or
                                                     now - self._last_data_s > read_idle_timeout_s):
                self._time_out()
                return
            self._check_handle = self.loop.call_later(CHECK_S, self._check)

        def _time_out(self) -> None:
            if self.cycle is None or not self.cycle.response_started:
                error = ApiError(408, f"the request did not arrive in time: send it whole within {read_timeout_s:g} s,"
                                      f" with no pause over {read_idle_timeout_s:g} s")
                body = json.dumps(error_body(error)).encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            if self.cycle is not None:
                self.cycle.disconnected = True  # the app stops waiting for the rest of the body
                self.cycle.message_event.set()
            self.transport.close()

    return GuardedH11

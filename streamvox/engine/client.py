"""The API server's handle on the engine process: starts it, routes its reports, and restarts it when it dies.

Runs on the server's asyncio loop and never imports torch. Every request gets a `RequestStream` whose queue
receives that request's Accepted, Audio, Finished and Failed messages in order. When the engine process exits,
crashes or stops reporting, every open stream gets a Failed(UNAVAILABLE) at once, `is_ready` turns false, and a
fresh engine is started on fresh sockets (so nothing meant for the old one reaches the new one).

Pacing: audio in a stream's queue has been made but not yet taken by the route that writes it to the client's
socket (a route takes the next piece only once the previous write was accepted). Beyond `max_unread_s` of it
the engine is told to pause the request, and to go on once half of it has been written; a paused stream whose
writer takes nothing for `reader_timeout_s` is cancelled, so a client that stops reading holds nothing for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from streamvox import protocol
from streamvox.config import EngineConfig

logger = logging.getLogger("streamvox.server")
POLL_S = 0.1  # how often the supervisor checks that the engine process is alive
RESTART_DELAY_S = 0.5


class EngineUnavailableError(Exception):
    """The engine is starting or restarting; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class RequestStream:
    request_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # Accepted | Audio | Finished | Failed
    unread_s: float = 0.0  # audio seconds in `queue`: made, not yet taken for writing
    is_paused: bool = False
    last_take_s: float = field(default_factory=time.monotonic)


class EngineClient:
    def __init__(self, config: EngineConfig, hang_timeout_s: float = 5.0, max_unread_s: float = 4.0,
                 reader_timeout_s: float = 60.0, rank: int = 0, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.rank = rank  # which of the server's engines this is (--data-parallel)
        self.env = {**(env or {}), "STREAMVOX_ENGINE_RANK": str(rank)}  # added to the engine process's environment
        self.hang_timeout_s = hang_timeout_s  # no report for this long while running: the engine is hung
        self.max_unread_s = max_unread_s
        self.reader_timeout_s = reader_timeout_s
        self.info: protocol.EngineReady | None = None
        self.stats: protocol.EngineStats | None = None
        self.status = "starting"
        self.num_restarts = 0
        self._streams: dict[str, RequestStream] = {}
        self._context = zmq.asyncio.Context()
        self._push: zmq.asyncio.Socket | None = None
        self._process: subprocess.Popen | None = None
        self._supervisor: asyncio.Task | None = None
        self._is_stopping = False
        self.on_report: Callable[[protocol.StepReport], None] | None = None  # e.g. the server's metrics

    @property
    def is_ready(self) -> bool:
        return self.status == "ready"

    @property
    def engine_pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise())

    async def stop(self) -> None:
        self._is_stopping = True
        if self._push is not None and self._process is not None and self._process.poll() is None:
            with contextlib.suppress(zmq.ZMQError):
                await self._push.send(protocol.encode(protocol.Shutdown()))
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self._context.term()

    # -- requests ------------------------------------------------------------------------------------------

    def open(self, request_id: str, text: str, voice: str | None, sampling: protocol.SamplingOverrides,
             text_complete: bool = True, reference: tuple[bytes, str] | None = None,
             options: dict[str, float] | None = None, instructions: str | None = None) -> RequestStream:
        """Send a request to the engine (with `text_complete` false, `text` is its first piece and `append_text`
        sends the rest; `reference`: int16 PCM of a voice clip and its transcript; `options`: the family's own,
        checked; `instructions`: a style prompt, for a model that takes one); its messages arrive on the returned
        stream's queue."""
        if not self.is_ready or self._push is None:
            raise EngineUnavailableError(f"the engine is {self.status}; retry shortly")
        pcm, transcript = reference if reference is not None else (None, None)
        message = protocol.encode(protocol.Submit(request_id, text, voice, sampling, text_complete, pcm, transcript,
                                                  options, instructions))
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        self._push.send(message)
        return stream

    def append_text(self, request_id: str, text: str, is_final: bool) -> None:
        """The next piece of an open request's text (nothing happens once its stream is closed)."""
        if request_id in self._streams and self._push is not None and self.is_ready:
            self._push.send(protocol.encode(protocol.AppendText(request_id, text, is_final)))

    async def take(self, stream: RequestStream) -> protocol.Accepted | protocol.Audio | protocol.Finished | \
            protocol.Failed:
        """The stream's next message; call it only once the previous audio was written (that is the pacing)."""
        message = await stream.queue.get()
        stream.last_take_s = time.monotonic()
        if isinstance(message, protocol.Audio):
            stream.unread_s -= self._seconds(message)
            if stream.is_paused and stream.unread_s <= self.max_unread_s / 2:
                self._pace(stream, False)
        return message

    def _seconds(self, audio: protocol.Audio) -> float:
        return len(audio.pcm) / 2 / self.info.sample_rate if self.info is not None else 0.0

    def _pace(self, stream: RequestStream, is_paused: bool) -> None:
        stream.is_paused = is_paused
        if self._push is not None and self.is_ready:
            self._push.send(protocol.encode(protocol.Pace(stream.request_id, is_paused)))

    def close(self, request_id: str, cancel: bool) -> None:
        """Stop routing a request; with `cancel`, also tell the engine to drop it (client gone)."""
        if self._streams.pop(request_id, None) is not None and cancel and self._push is not None and self.is_ready:
            self._push.send(protocol.encode(protocol.Cancel(request_id)))

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    # -- supervision ---------------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while not self._is_stopping:
            try:
                await self._run_one_engine()
            except asyncio.CancelledError:
                await self._kill()
                raise
            except Exception:  # noqa: BLE001 - keep supervising whatever went wrong
                logger.exception("engine supervision failed")
            self.status = "restarting" if not self._is_stopping else "stopped"
            self._fail_all("the engine stopped while this request was running; retry it")  # before a slow kill
            await self._kill()
            if self._is_stopping:
                return
            if self.info is None:  # it never started: a bad model, codec or flag, which a restart cannot mend
                logger.error("the engine could not start (its error is above); stopping the server")
                self.status = "failed"
                os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown; `serve` then exits with 1
                return
            self.num_restarts += 1
            self.status = "restarting"
            await asyncio.sleep(RESTART_DELAY_S)

    async def _run_one_engine(self) -> None:
        directory = tempfile.mkdtemp(prefix="streamvox-")
        input_addr, output_addr = f"ipc://{directory}/requests", f"ipc://{directory}/reports"
        push = self._context.socket(zmq.PUSH)
        pull = self._context.socket(zmq.PULL)
        command = [sys.executable, "-m", "streamvox.engine.process", "--config",
                   msgspec.json.encode(self.config).decode(), "--input", input_addr, "--output", output_addr]
        try:
            for socket, address in ((push, input_addr), (pull, output_addr)):
                socket.setsockopt(zmq.LINGER, 0)
                socket.bind(address)
            self._process = subprocess.Popen(command, env={**os.environ, **self.env})
            logger.info("engine %d: process %d starting (%s)", self.rank, self._process.pid, self.config.model)
            await self._serve_reports(push, pull)
        finally:
            self._push = None
            push.close()
            pull.close()
            shutil.rmtree(directory, ignore_errors=True)

    async def _serve_reports(self, push: zmq.asyncio.Socket, pull: zmq.asyncio.Socket) -> None:
        last_report_s = time.monotonic()
        while True:
            if self._process.poll() is not None:
                logger.error("engine process exited with code %s", self._process.returncode)
                return
            if self.is_ready and time.monotonic() - last_report_s > self.hang_timeout_s:
                logger.error("engine sent nothing for %.0f s; restarting it", self.hang_timeout_s)
                return
            if not await pull.poll(int(POLL_S * 1000)):
                self._drop_stalled_readers()
                continue
            while await pull.poll(0):
                message = protocol.decode_from_engine(await pull.recv())
                last_report_s = time.monotonic()
                if isinstance(message, protocol.EngineReady):
                    self.info, self._push, self.status = message, push, "ready"
                    logger.info("engine ready: %s (%s, policy %s)", message.model, message.family, message.policy)
                elif isinstance(message, protocol.EngineFailed):
                    logger.error("engine failed: %s", message.message)
                    return
                else:
                    self._route(message)

    def _route(self, report: protocol.StepReport) -> None:
        self.stats = report.stats
        if self.on_report is not None:
            self.on_report(report)
        for message in (*report.accepted, *report.failed, *report.finished, *report.audio):
            stream = self._streams.get(message.request_id)
            if stream is None:
                continue  # the client went away
            stream.queue.put_nowait(message)
            if isinstance(message, protocol.Audio):
                stream.unread_s += self._seconds(message)
                if not stream.is_paused and not message.is_last and stream.unread_s > self.max_unread_s:
                    self._pace(stream, True)
            if isinstance(message, protocol.Failed) or (isinstance(message, protocol.Audio) and message.is_last):
                del self._streams[message.request_id]
        self._drop_stalled_readers()

    def _drop_stalled_readers(self) -> None:
        """Cancel paused streams whose writer has taken nothing for `reader_timeout_s`; their unread audio goes."""
        now = time.monotonic()
        for stream in [s for s in self._streams.values() if s.is_paused]:
            if now - stream.last_take_s > self.reader_timeout_s:
                while not stream.queue.empty():
                    stream.queue.get_nowait()
                stream.unread_s = 0.0
                stream.queue.put_nowait(protocol.Failed(
                    stream.request_id, protocol.Failure.CLIENT_TOO_SLOW,
                    f"the client read nothing for {self.reader_timeout_s:g} s; the request was cancelled"))
                self.close(stream.request_id, cancel=True)

    def _fail_all(self, message: str) -> None:
        for stream in self._streams.values():
            stream.queue.put_nowait(protocol.Failed(stream.request_id, protocol.Failure.UNAVAILABLE, message))
        self._streams.clear()

    async def _kill(self) -> None:
        """Stop the engine process without blocking the event loop (SIGTERM, then SIGKILL after 2 s)."""
        self.status = "restarting" if not self._is_stopping else "stopped"
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        for _ in range(20):
            if process.poll() is not None:
                return
            await asyncio.sleep(0.1)
        process.kill()
        await asyncio.to_thread(process.wait)

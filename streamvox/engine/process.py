"""The engine process: loads the model, then loops receive -> prepare -> step -> report over ZeroMQ.

Started by the API server (`python -m streamvox.engine.process ...`), it dies with its parent (PR_SET_PDEATHSIG
and a parent check) and reports its own crash as EngineFailed before exiting. Text preparation (tokenisation)
runs on a worker pool, so a slow prompt never blocks the step loop; a request whose preparation raises fails
alone. Set STREAMVOX_FAULT_INJECTION="prepare=MARK,decode=MARK" to make requests whose text contains MARK fail at
that stage (decoding: after their first chunk); the failure tests use it, and it is off unless set. Likewise
STREAMVOX_SLOW_ENGINE="RANK:SECONDS" makes every LM step of the server's engine RANK (--data-parallel) that much
slower, warm-up included, as a GPU shared with another job would be; the routing tests use it.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import msgspec
import numpy as np
import torch
import zmq

from streamvox import protocol
from streamvox.audio import to_int16
from streamvox.config import EngineConfig, SamplingParams
from streamvox.engine.codec_pipeline import CALLS_KEPT
from streamvox.engine.core import EngineCore, QueueFullError, StepEvents
from streamvox.engine.requests import expected_tokens
from streamvox.models.base import Reference
from streamvox.models.registry import families
from streamvox.runner.device import describe
from streamvox.runner.weights import load_model

logger = logging.getLogger("streamvox.engine")
MESSAGES_PER_PASS = 64


@dataclass(frozen=True)
class FaultInjection:
    prepare_mark: str | None = None
    decode_mark: str | None = None
    step_delay_s: float = 0.0

    @classmethod
    def from_env(cls) -> FaultInjection:
        spec = os.environ.get("STREAMVOX_FAULT_INJECTION", "")
        marks = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
        rank, _, delay_s = os.environ.get("STREAMVOX_SLOW_ENGINE", "").partition(":")
        is_slow = bool(delay_s) and rank == os.environ.get("STREAMVOX_ENGINE_RANK", "0")
        return cls(marks.get("prepare"), marks.get("decode"), float(delay_s) if is_slow else 0.0)

    def slow_down(self, engine: EngineCore) -> None:
        """Every LM step of `engine` takes `step_delay_s` longer (measured by its step timer like real work)."""
        if self.step_delay_s:
            execute = engine.lm_runner.execute
            engine.lm_runner.execute = lambda batch: (time.sleep(self.step_delay_s), execute(batch))[1]


@dataclass
class _Preparing:
    future: Future  # -> prompt token ids
    text: str
    sampling: SamplingParams
    is_cancelled: bool = False


class EngineLoop:
    def __init__(self, engine: EngineCore, pull: zmq.Socket, push: zmq.Socket, faults: FaultInjection) -> None:
        self.engine = engine
        self.pull = pull
        self.push = push
        self.faults = faults
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare")
        self._preparing: dict[str, _Preparing] = {}
        self._failed: list[protocol.Failed] = []
        self._accepted: list[protocol.Accepted] = []
        self._decode_faults: set[str] = set()
        self._parent_pid = os.getppid()
        self._last_report_s = 0.0
        self._is_changed = False  # something the stats show changed without a step event (a cancel)
        self._lm_steps: deque[tuple[int, float]] = deque(maxlen=CALLS_KEPT)  # since the last report
        engine.codec.calls.clear()  # the metrics count serving, not the warm-up
        if faults.decode_mark:
            engine.codec.before_decode = self._inject_decode_fault

    def _inject_decode_fault(self, pending) -> None:
        if any(p.request_id in self._decode_faults and p.start_frame > 0 for p in pending):  # after its first audio
            raise RuntimeError("injected decode failure (STREAMVOX_FAULT_INJECTION)")

    def _refuse(self, request_id: str, error: Exception) -> None:
        """Report a request the engine will not run: at capacity (429) or bad input (400)."""
        if isinstance(error, QueueFullError):
            self._failed.append(protocol.Failed(request_id, protocol.Failure.AT_CAPACITY,
                                                f"the server is at capacity ({error}); retry shortly",
                                                error.retry_after_s))
        else:
            self._failed.append(protocol.Failed(request_id, protocol.Failure.BAD_REQUEST, str(error)))

    def run(self) -> None:
        while True:
            is_busy = self.engine.has_unfinished() or bool(self._preparing)
            if self.pull.poll(0 if is_busy else int(protocol.HEARTBEAT_S * 1000)):
                for _ in range(MESSAGES_PER_PASS):  # then a step and a report, however busy the socket
                    if not self.pull.poll(0):
                        break
                    message = protocol.decode_to_engine(self.pull.recv())
                    if isinstance(message, protocol.Shutdown):
                        return
                    self._handle(message)
            if os.getppid() != self._parent_pid:
                return  # the server is gone
            self._admit_prepared()
            events = self.engine.step() if self.engine.has_unfinished() else StepEvents()
            if not (events.num_rows or events.chunks) and is_busy:
                load = self.engine.load()
                if load.num_running and not self._preparing and load.num_held == load.num_running:
                    self.pull.poll(10)  # every request waits for text or its reader: wake on the next message
                else:
                    time.sleep(0.001)  # preparation or held frames: do not spin
            self._report(events)

    def _handle(self, message: protocol.Submit | protocol.AppendText | protocol.Pace | protocol.Cancel) -> None:
        if isinstance(message, protocol.AppendText):
            self._append_text(message)
            return
        if isinstance(message, protocol.Pace):
            self.engine.set_paused(message.request_id, message.is_paused)
            return
        if isinstance(message, protocol.Cancel):
            preparing = self._preparing.get(message.request_id)
            if preparing is not None:
                preparing.is_cancelled = True
            self.engine.cancel(message.request_id)
            self._decode_faults.discard(message.request_id)
            self._is_changed = True  # the next report goes out at once: the stats show the request gone
            return
        queued = len(self._preparing) + self.engine.load().num_waiting
        if queued >= self.engine.config.scheduler.max_queue_len:
            self._refuse(message.request_id, QueueFullError(f"{queued} requests are waiting"))
            return
        if (message.reference_pcm is not None or message.options) and not message.text_complete:
            self._refuse(message.request_id, ValueError("reference audio and a family's options cannot be combined "
                                                        "with text that streams in; send the whole text"))
            return
        overrides = msgspec.structs.asdict(message.sampling)
        try:
            if not message.text_complete:  # its pieces are small: tokenized here, in order with the rest
                self.engine.open_text_stream(message.request_id, message.text, message.voice, overrides,
                                             message.instructions)
                self._accepted.append(protocol.Accepted(message.request_id))
                return
            sampling = self.engine.check_request(message.text, message.voice, overrides)
        except (QueueFullError, ValueError) as error:
            self._refuse(message.request_id, error)
            return
        future = self._pool.submit(self._prepare, message.text, message.voice, message.reference_pcm,
                                   message.reference_text, message.options, message.instructions)
        self._preparing[message.request_id] = _Preparing(future, message.text, sampling)

    def _append_text(self, message: protocol.AppendText) -> None:
        try:
            self.engine.append_text(message.request_id, message.text, message.is_final)
        except KeyError:
            pass  # it ended, or was cancelled, or its text is complete (the server refuses text after the end)
        except (QueueFullError, ValueError) as error:
            self._refuse(message.request_id, error)

    def _prepare(self, text: str, voice: str | None, reference_pcm: bytes | None, reference_text: str | None,
                 options: dict[str, float] | None, instructions: str | None):
        if self.faults.prepare_mark and self.faults.prepare_mark in text:
            raise RuntimeError("injected prepare failure (STREAMVOX_FAULT_INJECTION)")
        reference = None
        if reference_pcm is not None:
            pcm = torch.from_numpy(np.frombuffer(reference_pcm, dtype=np.int16).astype(np.float32) / 32768.0)
            reference = Reference(reference_text or "", pcm)
        extra = {"options": options} if options else {}  # only families that declare options take them
        if instructions:  # only models that take instructions get them (the server checks)
            extra["instructions"] = instructions
        return self.engine.model.prepare_request(text, voice, reference, **extra)

    def _admit_prepared(self) -> None:
        for request_id, preparing in list(self._preparing.items()):
            if not preparing.future.done():
                continue
            del self._preparing[request_id]
            if preparing.is_cancelled:
                continue
            try:
                expected = expected_tokens(self.engine.model, preparing.text)
                self.engine.add_request(request_id, preparing.future.result(), preparing.sampling, expected)
            except (QueueFullError, ValueError) as error:
                self._refuse(request_id, error)
            except Exception as error:  # noqa: BLE001 - this request fails, the engine goes on
                logger.exception("preparing request %s failed", request_id)
                self._failed.append(protocol.Failed(request_id, protocol.Failure.ENGINE_ERROR,
                                                    f"preparing the text failed: {error}"))
            else:
                self._accepted.append(protocol.Accepted(request_id))
                if self.faults.decode_mark and self.faults.decode_mark in preparing.text:
                    self._decode_faults.add(request_id)

    def _report(self, events: StepEvents) -> None:
        failed = self._failed + [protocol.Failed(f.request_id, f.failure, f.message, f.retry_after_s)
                                 for f in events.failures]
        accepted, self._failed, self._accepted = self._accepted, [], []
        if events.num_rows:
            self._lm_steps.append((events.num_rows, events.step_s))
        now = time.monotonic()
        if not (events.chunks or events.finish_reasons or failed or accepted or self._is_changed) and \
                now - self._last_report_s < protocol.HEARTBEAT_S:
            return
        self._last_report_s, self._is_changed = now, False
        engine = self.engine
        audio = [
            protocol.Audio(c.request_id, to_int16(c.pcm).tobytes(), c.start_frame, c.end_frame, c.is_last)
            for c in events.chunks
        ]
        finished = [
            protocol.Finished(request_id, reason.value, events.num_prompt_tokens[request_id],
                              events.num_output_tokens[request_id])
            for request_id, reason in events.finish_reasons.items()
        ]
        for request_id in [c.request_id for c in events.chunks if c.is_last] + [f.request_id for f in failed]:
            self._decode_faults.discard(request_id)
        load = engine.load()
        stats = protocol.EngineStats(
            num_requests=engine.num_requests + len(self._preparing),
            num_waiting=load.num_waiting + len(self._preparing),
            num_running=load.num_running,
            num_held=load.num_held,
            capacity=load.capacity,
            num_free_blocks=load.num_free_blocks,
            num_blocks=load.num_blocks,
            step_s=events.step_s,
            batch_size=events.num_rows,
            lm_steps=list(self._lm_steps),
            codec_calls=list(engine.codec.calls),
        )
        self._lm_steps.clear()
        engine.codec.calls.clear()
        self.push.send(protocol.encode(protocol.StepReport(audio, finished, failed, stats, accepted)))


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the loop's parent check still ends the process


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="streamvox engine process (started by `streamvox serve`)")
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    parser.add_argument("--input", required=True, help="ZeroMQ address to receive requests from")
    parser.add_argument("--output", required=True, help="ZeroMQ address to send reports to")
    args = parser.parse_args(argv)
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.connect(args.input)
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(args.output)
    try:
        config = msgspec.json.decode(args.config, type=EngineConfig)
        if config.engine == "naive":
            from streamvox.engine.naive import NaiveEngine, NaiveLoop

            engine = NaiveEngine(config)
        else:
            engine = EngineCore(load_model(config.model, config.codec, config.dtype, config.device), config)
            lm = engine.lm_runner
            logger.info("engine on %s, %s, %s attention, KV cache of %d blocks of %d positions (%.2f GiB)",
                        describe(lm.device), str(lm.kv_cache.dtype).replace("torch.", ""), lm.attention,
                        engine.pool.num_blocks, lm.block_size,
                        lm.kv_cache.numel() * lm.kv_cache.element_size() / 2**30)
        faults = FaultInjection.from_env()
        if config.engine != "naive":
            faults.slow_down(engine)
        engine.warm_up()
        model = engine.model
        push.send(protocol.encode(protocol.EngineReady(
            config.model, model.family, model.timing.sample_rate, list(model.voices), model.default_voice,
            model.is_random_weights, "naive" if config.engine == "naive" else config.scheduler.policy, os.getpid(),
            model.takes_reference_audio and config.engine != "naive",
            model.open_text_stream() is not None and config.engine != "naive",
            dict(model.options) if config.engine != "naive" else {},
            model.keeps_context and config.engine != "naive",
            model.takes_instructions and config.engine != "naive",
            [f"{family.name} ({family.model.style_prompt})" for family in families().values()
             if family.model.style_prompt],
        )))
        if config.engine == "naive":
            NaiveLoop(engine, config, pull, push, args.output, context).run()
        else:
            EngineLoop(engine, pull, push, faults).run()
    except BaseException as error:  # report our own death, whatever it is
        message = "".join(traceback.format_exception_only(error)).strip()
        logger.error("engine failed: %s\n%s", message, traceback.format_exc())
        push.send(protocol.encode(protocol.EngineFailed(message)))
        push.close()
        context.term()
        sys.exit(1)
    push.close(linger=0)
    pull.close(linger=0)
    context.term()


if __name__ == "__main__":
    main()

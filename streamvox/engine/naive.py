"""The baseline behind `streamvox serve --engine naive`: a speech LM served the way its reference code does it.

One request at a time, in arrival order. The checkpoint's `transformers` model runs `generate()` with the
request's sampling, and each frame goes through the reference codec package (`snac`) as soon as the frames
its window needs exist, then straight to the client. No batching, no KV paging, no scheduler, no overlap of
LM and codec. It speaks the same messages as the real engine, so the HTTP API, formats and errors in front of
it are the same; only the engine differs. Benchmarks put it beside `streamvox serve` on the same checkpoint.

Known differences from the engine: `transformers` applies the repetition penalty to the prompt too, and draws
from torch's global generator (seeded per request), so a seed gives other tokens than in the engine.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import msgspec
import torch
import zmq

from streamvox import protocol
from streamvox.audio import to_int16
from streamvox.codecs.snac import split_levels
from streamvox.config import EngineConfig, SamplingParams
from streamvox.engine.requests import check_request
from streamvox.models.orpheus import decode_windows
from streamvox.models.registry import detect_family
from streamvox.runner.device import resolve_device, resolve_dtype
from streamvox.runner.weights import default_codec_dir, resolve_checkpoint

logger = logging.getLogger("streamvox.engine")
LOOKAHEAD_FRAMES = 2  # frame f is decoded from the window [f-1, f+2], as in the engine (edges repeated)
FAMILIES = ("orpheus",)  # the families this baseline can run


@dataclass
class _Job:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    is_cancelled: bool = False


@dataclass
class _Queue:
    jobs: collections.deque[_Job] = field(default_factory=collections.deque)
    current: _Job | None = None
    lock: threading.Condition = field(default_factory=threading.Condition)


class NaiveEngine:
    """The reference-style pipeline for one family (orpheus: transformers Llama + the snac package)."""

    def __init__(self, config: EngineConfig) -> None:
        try:
            import snac
            import transformers
        except ImportError as missing:
            raise ValueError(f"--engine naive needs {missing.name}: pip install 'streamvox[baseline]'") from None
        from streamvox.runner.weights import load_model

        path = resolve_checkpoint(config.model)
        family = detect_family(path, config.model)
        if family.name not in FAMILIES:
            raise ValueError(f"there is no naive baseline for the {family.name} family yet")
        self.device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, self.device)
        # the prompt format, voices and frames (its backbone stays on the meta device: no copy of the weights)
        self.model = load_model(config.model, config.codec, config.dtype, "meta")
        self.lm = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).to(self.device).eval()
        codec_dir = resolve_checkpoint(config.codec) if config.codec else default_codec_dir(path, family)
        self.codec = snac.SNAC.from_config(str(codec_dir / "config.json"))
        self.codec.load_state_dict(torch.load(codec_dir / "pytorch_model.bin", weights_only=True))
        self.codec.to(self.device).eval()  # fp32, as the publisher decodes
        if config.num_threads:
            torch.set_num_threads(config.num_threads)  # else torch's default: every core, nothing runs beside it

    def warm_up(self) -> None:
        steps = (LOOKAHEAD_FRAMES + 2) * self.model.timing.lm_steps_per_frame
        sampling = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, seed=0)
        self.generate(_Job("warm-up", self.model.prepare("warm up", None), sampling), lambda message: None)

    def generate(self, job: _Job, send) -> None:
        """Run one request to the end, calling send(Audio | Finished) as its frames are decoded."""
        params = job.sampling
        torch.manual_seed(params.seed)
        streamer = _FrameStreamer(self, job, send)
        sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                        min_p=params.min_p or None) if not params.is_greedy else dict(do_sample=False)
        stop_ids = sorted(self.model.stop_token_ids)
        with torch.inference_mode():
            output = self.lm.generate(
                torch.tensor([job.prompt], device=self.device),
                attention_mask=torch.ones(1, len(job.prompt), dtype=torch.long, device=self.device),
                max_new_tokens=params.max_tokens, min_new_tokens=params.max_tokens if params.ignore_eos else None,
                repetition_penalty=params.repetition_penalty, eos_token_id=stop_ids, pad_token_id=stop_ids[0],
                streamer=streamer, stopping_criteria=[_Cancelled(job)], **sampling,
            )
        if job.is_cancelled:
            return
        num_output = output.shape[1] - len(job.prompt)
        is_stop = num_output < params.max_tokens and int(output[0, -1]) in self.model.stop_token_ids
        send(protocol.Finished(job.request_id, "stop" if is_stop else "length", len(job.prompt), num_output))
        streamer.flush()

    def decode(self, frames: list[tuple[int, ...]], start: int, end: int) -> bytes:
        """PCM of frames [start, end), each from its own 4-frame window through the snac package."""
        windows = decode_windows(torch.tensor(frames), start, end).to(self.device)
        spf = self.model.timing.samples_per_frame
        with torch.inference_mode():
            pcm = torch.cat([self.codec.decode(split_levels(w[None]))[0, 0, spf:2 * spf] for w in windows])
        return to_int16(pcm.float().cpu().numpy()).tobytes()


class _Cancelled:
    """A transformers stopping criterion: stop as soon as the client is gone."""

    def __init__(self, job: _Job) -> None:
        self.job = job

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.job.is_cancelled, dtype=torch.bool)


class _FrameStreamer:
    """A transformers streamer: collects tokens into frames and decodes each frame once its window exists."""

    def __init__(self, engine: NaiveEngine, job: _Job, send) -> None:
        self.engine, self.job, self.send = engine, job, send
        self.builder = engine.model.new_frame_builder()
        self.frames: list[tuple[int, ...]] = []
        self.num_sent = 0
        self.is_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self.is_prompt:  # generate() hands over the prompt first
            self.is_prompt = False
            return
        frame = self.builder.push(int(value.reshape(-1)[0]))
        if frame is None or self.job.is_cancelled:
            return
        self.frames.append(frame)
        if len(self.frames) > self.num_sent + LOOKAHEAD_FRAMES:
            self._send(len(self.frames) - LOOKAHEAD_FRAMES, is_last=False)

    def end(self) -> None:
        pass  # the tail goes out after Finished, from flush()

    def flush(self) -> None:
        self._send(len(self.frames), is_last=True)

    def _send(self, end: int, is_last: bool) -> None:
        start, self.num_sent = self.num_sent, end
        pcm = self.engine.decode(self.frames, start, end) if end > start else b""
        self.send(protocol.Audio(self.job.request_id, pcm, start, end, is_last))


class NaiveLoop:
    """The engine process's loop for the baseline: the main thread generates the requests one after another
    and sends their audio on its own socket; a listener thread takes messages and reports state. (torch runs
    20-30 % slower on a thread other than the one that first used it, so generation keeps the main one.)"""

    def __init__(self, engine: NaiveEngine, config: EngineConfig, pull: zmq.Socket, push: zmq.Socket,
                 output: str, context: zmq.Context) -> None:
        self.engine, self.config, self.pull, self.push = engine, config, pull, push
        self.queue = _Queue()
        self._worker_push = context.socket(zmq.PUSH)  # zmq sockets are not shared between threads
        self._worker_push.connect(output)
        self._stop = False
        self._error: BaseException | None = None
        self._is_done = threading.Event()  # the main thread stopped: the listener stops too
        self._listener = threading.Thread(target=self._listen, name="naive-listen", daemon=True)

    def run(self) -> None:
        self._listener.start()
        try:
            self._work()
        finally:
            self._is_done.set()
            self._listener.join(timeout=5)
            self._worker_push.close(linger=0)
        if self._error is not None:
            raise self._error

    def _listen(self) -> None:
        last_report = 0.0
        try:
            while not self._is_done.is_set():
                if self.pull.poll(int(protocol.HEARTBEAT_S * 1000 / 2)):
                    while self.pull.poll(0):
                        message = protocol.decode_to_engine(self.pull.recv())
                        if isinstance(message, protocol.Shutdown):
                            return
                        self._handle(message)
                if time.monotonic() - last_report >= protocol.HEARTBEAT_S:
                    last_report = time.monotonic()
                    self.push.send(protocol.encode(protocol.StepReport([], [], [], self._stats())))
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which reports it
            self._error = error
        finally:
            with self.queue.lock:
                self._stop = True
                if self.queue.current is not None:
                    self.queue.current.is_cancelled = True
                self.queue.lock.notify()

    def _handle(self, message: protocol.Submit | protocol.AppendText | protocol.Pace | protocol.Cancel) -> None:
        queue = self.queue
        if isinstance(message, protocol.AppendText | protocol.Pace):
            return  # text streams are refused here, and a one-at-a-time baseline is not paced
        if isinstance(message, protocol.Cancel):
            with queue.lock:
                if queue.current is not None and queue.current.request_id == message.request_id:
                    queue.current.is_cancelled = True
                queue.jobs = collections.deque(j for j in queue.jobs if j.request_id != message.request_id)
            return
        failed, accepted = None, []
        try:
            if not message.text_complete or message.reference_pcm is not None:
                raise ValueError("the naive baseline takes whole texts only, without reference audio")
            sampling = check_request(self.engine.model, message.text, message.voice,
                                     msgspec.structs.asdict(message.sampling), self.config.scheduler.max_audio_s)
            prompt = self.engine.model.prepare(message.text, message.voice)
        except ValueError as error:
            failed = protocol.Failed(message.request_id, protocol.Failure.BAD_REQUEST, str(error))
        else:
            with queue.lock:
                if len(queue.jobs) >= self.config.scheduler.max_queue_len:
                    failed = protocol.Failed(message.request_id, protocol.Failure.AT_CAPACITY, "the server is at "
                                             f"capacity ({len(queue.jobs)} requests are waiting); retry shortly", 5.0)
                else:
                    queue.jobs.append(_Job(message.request_id, prompt, sampling))
                    queue.lock.notify()
                    accepted = [protocol.Accepted(message.request_id)]
        self.push.send(protocol.encode(protocol.StepReport([], [], [failed] if failed else [], self._stats(),
                                                           accepted)))

    def _stats(self) -> protocol.EngineStats:
        with self.queue.lock:
            running = int(self.queue.current is not None)
            waiting = len(self.queue.jobs)
        return protocol.EngineStats(num_requests=running + waiting, num_waiting=waiting, num_running=running,
                                    num_held=0, capacity=1, num_free_blocks=0, num_blocks=0, step_s=0.0,
                                    batch_size=running)

    def _work(self) -> None:
        def send(message) -> None:
            audio = [message] if isinstance(message, protocol.Audio) else []
            finished = [message] if isinstance(message, protocol.Finished) else []
            failed = [message] if isinstance(message, protocol.Failed) else []
            self._worker_push.send(protocol.encode(protocol.StepReport(audio, finished, failed, self._stats())))

        while True:
            with self.queue.lock:
                while not self.queue.jobs and not self._stop:
                    self.queue.lock.wait()
                if self._stop:
                    return
                job = self.queue.current = self.queue.jobs.popleft()
            try:
                self.engine.generate(job, send)
            except Exception as error:  # noqa: BLE001 - this request fails, the next one runs
                logger.exception("naive generation of %s failed", job.request_id)
                send(protocol.Failed(job.request_id, protocol.Failure.ENGINE_ERROR, f"generation failed: {error}"))
            finally:
                with self.queue.lock:
                    self.queue.current = None

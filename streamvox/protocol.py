"""Messages between the API server and the engine process (msgpack via msgspec, one ZeroMQ frame each).

Server -> engine: Submit, AppendText, Pace, Cancel, Shutdown. Engine -> server: EngineReady once it has loaded the
model, then one StepReport per engine step that produced anything (and at least one per heartbeat interval),
EngineFailed if it is about to die. Imports nothing from the package; no torch.
"""

from __future__ import annotations

import enum

import msgspec

HEARTBEAT_S = 0.5  # the engine reports at least this often, even when idle


class SamplingOverrides(msgspec.Struct, frozen=True, omit_defaults=True):
    """Sampling fields a client set; None keeps the model's default."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    repetition_window: int | None = None
    seed: int | None = None
    max_tokens: int | None = None
    ignore_eos: bool | None = None


class Submit(msgspec.Struct, tag=True, frozen=True):
    """Start speaking `text` (with `text_complete` false: its first piece, AppendText brings the rest)."""

    request_id: str
    text: str
    voice: str | None
    sampling: SamplingOverrides
    text_complete: bool = True
    reference_pcm: bytes | None = None  # a clip of the voice to speak in: int16 mono at the model's sample rate
    reference_text: str | None = None  # what is said in it
    options: dict[str, float] | None = None  # the family's own request options (EngineReady.options), checked
    instructions: str | None = None  # a style prompt, for a model that takes one (EngineReady.takes_instructions)


class AppendText(msgspec.Struct, tag=True, frozen=True):
    """The next piece of a request's text (`is_final` with the last)."""

    request_id: str
    text: str
    is_final: bool


class Pace(msgspec.Struct, tag=True, frozen=True):
    """The request's client is behind in reading what was sent (`is_paused`): stop generating until it catches
    up; or it has caught up: go on."""

    request_id: str
    is_paused: bool


class Cancel(msgspec.Struct, tag=True, frozen=True):
    """Stop a request and free everything it holds (client gone or barge-in)."""

    request_id: str


class Shutdown(msgspec.Struct, tag=True, frozen=True):
    """Exit cleanly."""


class EngineReady(msgspec.Struct, tag=True, frozen=True):
    """The engine has loaded its model and takes requests."""

    model: str  # what the engine was started with (directory, hub id or tiny-* name)
    family: str
    sample_rate: int
    voices: list[str]
    default_voice: str | None
    is_random_weights: bool
    policy: str
    pid: int
    takes_reference_audio: bool = False  # a voice clip with its transcript can steer the voice (/generate audio)
    takes_text_stream: bool = False  # text may arrive in pieces (WS /v1/audio/speech/stream)
    options: dict[str, tuple[float, float, float]] = {}  # the family's request options: name -> (default, low, high)
    keeps_context: bool = False  # reference audio may be the previous turn (text streamed in pieces keeps prosody)
    takes_instructions: bool = False  # a style prompt (OpenAI's `instructions`) steers the voice
    style_families: list[str] = []  # the families that take one, and which of their checkpoints: for messages


class Audio(msgspec.Struct, frozen=True):
    """One chunk of a request's audio, in order."""

    request_id: str
    pcm: bytes  # int16 little-endian mono at the model's sample rate
    start_frame: int
    end_frame: int
    is_last: bool


class Finished(msgspec.Struct, frozen=True):
    """The request's LM stopped (its remaining audio still follows as Audio)."""

    request_id: str
    reason: str  # stop | length | capacity
    num_prompt_tokens: int
    num_output_tokens: int


class Failure(enum.Enum):
    """Why a request failed; the server maps each to an HTTP status."""

    BAD_REQUEST = "bad_request"  # the client must change the request (400)
    AT_CAPACITY = "at_capacity"  # it cannot start in time; retry after `retry_after_s` (429)
    ENGINE_ERROR = "engine_error"  # it raised inside the engine (500)
    UNAVAILABLE = "unavailable"  # the engine is gone or restarting (503)
    CLIENT_TOO_SLOW = "client_too_slow"  # its client stopped reading what was sent (408)


class Accepted(msgspec.Struct, frozen=True):
    """The engine has queued the request: it will start within its queue bound (or fail later with a reason)."""

    request_id: str


class Failed(msgspec.Struct, frozen=True):
    """The request ended with an error; nothing more comes for it."""

    request_id: str
    failure: Failure
    message: str
    retry_after_s: float = 0.0  # AT_CAPACITY: when the engine expects room for it


class EngineStats(msgspec.Struct, frozen=True):
    num_requests: int  # requests holding any engine state (preparing, queued, generating or decoding)
    num_waiting: int
    num_running: int
    num_held: int  # running but paused: by a slow reader, or waiting for streamed text
    capacity: int  # streams the engine predicts it can keep ahead of playback
    num_free_blocks: int
    num_blocks: int
    step_s: float  # measured duration of the last LM step
    batch_size: int  # LM rows in the last step
    lm_steps: list[tuple[int, float]] = []  # (rows, seconds) of every LM step since the last report
    codec_calls: list[tuple[int, float]] = []  # (frames, seconds) of every codec call since the last report


class StepReport(msgspec.Struct, tag=True, frozen=True):
    """Everything one engine step produced."""

    audio: list[Audio]
    finished: list[Finished]
    failed: list[Failed]
    stats: EngineStats
    accepted: list[Accepted] = []


class EngineFailed(msgspec.Struct, tag=True, frozen=True):
    """The engine hit an error it cannot survive and is exiting."""

    message: str


ToEngine = Submit | AppendText | Pace | Cancel | Shutdown
FromEngine = EngineReady | StepReport | EngineFailed

_encoder = msgspec.msgpack.Encoder()
_to_engine = msgspec.msgpack.Decoder(ToEngine)
_from_engine = msgspec.msgpack.Decoder(FromEngine)


def encode(message: ToEngine | FromEngine) -> bytes:
    return _encoder.encode(message)


def decode_to_engine(data: bytes) -> ToEngine:
    return _to_engine.decode(data)


def decode_from_engine(data: bytes) -> FromEngine:
    return _from_engine.decode(data)

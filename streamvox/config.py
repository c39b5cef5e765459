"""Frozen configuration and per-request parameter types. Imports nothing from the package."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3  # beside 0 (greedy)
MAX_PENALTY = 1e3  # repetition_penalty within [1 / MAX_PENALTY, MAX_PENALTY]


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples its next token. `temperature == 0` means greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    min_p: float = 0.0  # 0.0 disables
    repetition_penalty: float = 1.0  # 1.0 disables
    repetition_window: int = 0  # last N generated tokens are penalised; 0 = all of them
    seed: int | None = None  # None draws a fresh seed per request
    max_tokens: int = 1200  # backbone LM steps (not counting the prompt)
    ignore_eos: bool = False  # keep generating past the stop token (fixed-length benchmarks)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first field that has the wrong type or is out of range."""
        for name in ("top_k", "repetition_window", "max_tokens", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        # bounds that keep every step of sampling finite in float32: logits (tens at most) divided by the
        # temperature or scaled by the penalty stay far from overflow
        checks = [
            (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE,
             f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"),
            (0 <= self.top_k <= 2**31, "top_k must be in [0, 2**31] (0 disables it)"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1] (1 disables it)"),
            (0.0 <= self.min_p < 1.0, "min_p must be in [0, 1) (0 disables it)"),
            (1 / MAX_PENALTY <= self.repetition_penalty <= MAX_PENALTY,
             f"repetition_penalty must be in [{1 / MAX_PENALTY:g}, {MAX_PENALTY:g}] (1 disables it)"),
            (0 <= self.repetition_window <= 2**31,
             "repetition_window must be in [0, 2**31] (0 means all generated tokens)"),
            (1 <= self.max_tokens <= 2**31, "max_tokens must be in [1, 2**31]"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be in [0, 2**63)"),
        ]
        for is_ok, message in checks:
            if not is_ok:
                raise ValueError(message)

    def replace(self, **changes: object) -> SamplingParams:
        """A copy with the given fields changed (fields left as None are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry."""

    block_size: int = 16  # tokens per KV block
    num_blocks: int = 0  # 0 = derive from kv_cache_mb
    kv_cache_mb: int = 0  # KV budget when num_blocks == 0; 0 = 256 MB on the CPU, gpu_memory_utilization on CUDA
    gpu_memory_utilization: float = 0.85  # CUDA: share of the GPU's memory the engine may fill (weights + KV + work)

    def validate(self) -> None:
        if self.block_size < 1 or self.num_blocks < 0 or self.kv_cache_mb < 0:
            raise ValueError("block_size must be >= 1, num_blocks and kv_cache_mb >= 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


POLICY_NAMES = ("streaming", "offline", "fcfs")
DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"
ATTENTION_BACKENDS = ("auto", "gather", "triton")  # auto: triton on CUDA when it imports, else gather
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on CUDA, float32 on the CPU
RANDOM_INIT_KEY = "streamvox_random_init"  # in a weightless full-size config.json: {"seed": N}


def random_init_seed(config: dict) -> int | None:
    """The seed a weightless config (a model's or a codec's) asks its weights to be drawn from; None if it has
    weights."""
    return int(config[RANDOM_INIT_KEY]["seed"]) if RANDOM_INIT_KEY in config else None


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine step and the scheduling policy."""

    policy: str = "streaming"  # streaming (playback deadlines), offline (throughput) or fcfs (comparison)
    max_num_seqs: int = 64  # requests in one LM batch
    max_num_batched_tokens: int = 512  # prompt + decode tokens in one LM step
    max_queue_len: int = 64  # waiting requests beyond this are refused (HTTP 429)
    max_queue_wait_s: float = 1.5  # served: a request predicted to wait longer to start is refused at once (429)
    max_prompt_tokens: int = 2048  # a longer prompt is refused (HTTP 400)
    max_audio_s: float = 120.0  # the most audio one request may ask for (max_tokens beyond it: HTTP 400)
    ttfa_target_s: float = 0.5  # a new request's first chunk is due this long after it arrived
    client_prebuffer_s: float = 0.0  # audio a client buffers before it starts playing
    urgent_slack_s: float = 1.0  # streaming: a request with less slack than this is urgent
    realtime_headroom: float = 0.9  # streaming: admit while the predicted step time <= this share of real time
    codec_headroom: float = 0.75  # streaming: admit while the codec is busy <= this share of real time (lower: every
    # new stream's first chunk queues there behind the playing streams' chunks)
    max_codec_frames: int = 8  # frames decoded in one codec call (on CPU a frame costs least at about 8)
    max_chunk_s: float = 0.7  # streaming: a chunk is decoded once it holds this much audio, due or not
    codec_hold_margin_s: float = 1.0  # streaming: decode once the client has less than this (+ codec time) left

    def validate(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of: {', '.join(POLICY_NAMES)}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_codec_frames < 1:
            raise ValueError(f"a step must take >= 1 request, >= 1 token and >= 1 chunk, got {self}")
        if self.max_queue_len < 0 or self.ttfa_target_s <= 0 or self.client_prebuffer_s < 0:
            raise ValueError("max_queue_len and client_prebuffer_s must be >= 0 and ttfa_target_s > 0")
        if self.max_queue_wait_s <= 0 or self.max_prompt_tokens < 1 or self.max_audio_s <= 0:
            raise ValueError("max_queue_wait_s and max_audio_s must be > 0 and max_prompt_tokens >= 1")
        if not (0 < self.realtime_headroom <= 1 and 0 < self.codec_headroom <= 1):
            raise ValueError("realtime_headroom and codec_headroom must be in (0, 1]")


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to build an engine."""

    model: str = "tiny-orpheus"  # a directory, a hub id, or a tiny-* name
    engine: str = "streamvox"  # or "naive": the one-request-at-a-time baseline (streamvox/engine/naive.py)
    codec: str | None = None  # codec directory or hub id; None = the family's default
    device: str = "auto"  # auto (CUDA when present), cpu, cuda or cuda:N
    dtype: str = "auto"  # of the backbone and KV cache: auto, float32, bfloat16 or float16 (codecs keep their own)
    num_threads: int = 0  # CPU threads for torch ops; 0 = half the cores (the codec thread runs beside the LM)
    attention: str = "auto"  # attention backend (ATTENTION_BACKENDS): gather copies contexts, triton reads in place
    cuda_graphs: bool = True  # CUDA + triton: decode steps replay graphs captured per batch size in the warm-up
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP API server in front of the engine process."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_input_chars: int = 4096  # longest text one request may speak
    max_upload_mb: float = 10.0  # largest reference-audio upload
    served_model_name: str | None = None  # the `model` clients send; None = the model argument as given
    # no report from the engine for this long (it reports twice a second when idle): it is hung; its streams fail
    # and it is restarted
    engine_hang_timeout_s: float = 5.0
    max_unread_s: float = 4.0  # audio made but not yet written to a slow client beyond this pauses its request
    reader_timeout_s: float = 60.0  # a paused request whose client reads nothing for this long is cancelled
    read_timeout_s: float = 60.0  # a request's headers and body must arrive within this of its first byte (408)
    read_idle_timeout_s: float = 10.0  # ... with no pause longer than this (slowloris, half-sent bodies)
    ws_start_timeout_s: float = 10.0  # a WebSocket that sends no start message for this long is closed (408)
    # keys a request must bear (Authorization: Bearer KEY) on every route but /health and the playground; none:
    # the API is open. STREAMVOX_API_KEYS (comma-separated) adds more. The flag is --api-key, repeatable.
    api_keys: tuple[str, ...] = dataclasses.field(default=(), metadata={"flag": "api-key"})
    # browser origins allowed to call the API (CORS) and open its WebSocket; "*" for any. --cors-origin, repeatable
    cors_origins: tuple[str, ...] = dataclasses.field(default=(), metadata={"flag": "cors-origin"})
    # OpenAI voice names -> the model's voices, beyond the default table (server/voices.py): --voice-alias NAME=VOICE
    voice_aliases: tuple[str, ...] = dataclasses.field(default=(), metadata={"flag": "voice-alias"})
    data_dir: str = ""  # stored voices live here ("": $STREAMVOX_DATA, else ~/.local/share/streamvox)
    max_concurrent_streams: int = 0  # streams the server holds open at once, beyond which it answers 429; 0: no limit
    data_parallel: int = 1  # engine processes behind the server, each request routed to the one with most headroom
    data_parallel_routing: str = "load"  # "load"; or "round-robin", blind to load (for comparison)

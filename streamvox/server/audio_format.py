"""Response audio formats: int16 mono PCM -> the bytes one HTTP response streams (never imports torch).

Every encoder here is incremental: `StreamEncoder.encode` returns each byte the container can emit as soon as the
codec has produced it, so a client can start playback while the engine is still generating. pcm and wav are
pure byte framing; mp3, opus (Ogg), flac and aac (ADTS) go through PyAV (ffmpeg) into an in-memory sink that is
drained on every call, so memory per stream stays bounded (a few codec frames), however long the response; mulaw
and alaw are G.711's byte a sample at 8 kHz. A response at another rate than the model's goes through ffmpeg's
resampler (swresample) first, which holds back only its filter's few samples until the end.
"""

from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass, field

import av
import numpy as np
from av.codec.codec import UnknownCodecError

FORMATS: tuple[str, ...] = ("pcm", "wav", "mp3", "opus", "flac", "aac", "mulaw", "alaw")
SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)  # a response may ask for any of these
G711_RATE = 8000  # mulaw and alaw are telephony's: 8 kHz, a byte a sample, no header

_MEDIA_TYPES = {
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",  # Ogg Opus
    "flac": "audio/flac",
    "aac": "audio/aac",  # ADTS frames
    "mulaw": "audio/basic",  # G.711 µ-law, 8 kHz
    "alaw": "audio/x-alaw-basic",  # G.711 A-law, 8 kHz
}
_G711_ENCODERS = {"mulaw": "pcm_mulaw", "alaw": "pcm_alaw"}

_BYTES_PER_SAMPLE = 2  # int16 mono
_WAV_UNKNOWN_SIZE = 0xFFFFFFFF  # RIFF/data size while streaming; wave and ffmpeg then read to end of stream
_AVIO_BUFFER_BYTES = 4096  # ffmpeg's write buffer in front of the sink; flushed after every packet anyway


class UnsupportedFormat(ValueError):  # noqa: N818 -- the HTTP layer's name for it; a ValueError, so a 400
    """The requested response format is unknown, or its encoder is missing from this ffmpeg build."""


@dataclass(frozen=True)
class _AvCodec:
    """How one compressed format is produced by ffmpeg: muxer, encoder and the options that keep it streaming."""

    muxer: str  # ffmpeg output format name
    encoder: str  # ffmpeg encoder name
    bit_rate: int  # bits/s for the mono stream; 0 = lossless, leave to the encoder
    muxer_options: dict[str, str] = field(default_factory=dict)
    encoder_options: dict[str, str] = field(default_factory=dict)


# flush_packets=1: write every muxed packet through to the sink at once instead of filling the AVIO buffer.
_STREAMING = {"flush_packets": "1"}

_AV_CODECS = {
    # No ID3v2 tag: a bare MP3 frame stream, which every `audio/mpeg` streaming client accepts.
    "mp3": _AvCodec("mp3", "libmp3lame", 64_000, {**_STREAMING, "id3v2_version": "0"}),
    # page_duration is in µs; the default (1 s) holds ~50 Opus packets back in one Ogg page. 1 µs closes a page
    # after every packet: each 20 ms packet goes out at once, for 27-28 bytes of page header per packet.
    "opus": _AvCodec("ogg", "libopus", 32_000, {**_STREAMING, "page_duration": "1"}),
    # By default the muxer pads the header with 8 KiB for a later STREAMINFO rewrite, which a stream never does.
    # 1024-sample blocks (~43 ms at 24 kHz) instead of the encoder's ~100 ms default halve the latency.
    "flac": _AvCodec("flac", "flac", 0, {**_STREAMING, "metadata_header_padding": "0"}, {"frame_size": "1024"}),
    "aac": _AvCodec("adts", "aac", 64_000, dict(_STREAMING)),
}


@functools.cache
def available_formats() -> tuple[str, ...]:
    """Formats this process can encode, in `FORMATS` order: pcm and wav always, the rest if ffmpeg has them."""

    def has(codec: _AvCodec) -> bool:
        try:
            av.codec.Codec(codec.encoder, "w")
        except UnknownCodecError:
            return False
        return codec.muxer in av.formats_available

    return tuple(fmt for fmt in FORMATS if fmt not in _AV_CODECS or has(_AV_CODECS[fmt]))


def media_type(fmt: str) -> str:
    """HTTP Content-Type for a response in `fmt`."""
    _check_available(fmt)
    return _MEDIA_TYPES[fmt]


def wav_header(sample_rate: int, num_samples: int | None) -> bytes:
    """44-byte RIFF/WAVE header for int16 mono; `num_samples=None` marks the length unknown (streaming)."""
    if num_samples is None:
        riff_size = data_size = _WAV_UNKNOWN_SIZE
    else:
        data_size = num_samples * _BYTES_PER_SAMPLE
        riff_size = 36 + data_size
    byte_rate = sample_rate * _BYTES_PER_SAMPLE
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", riff_size, b"WAVE",
        b"fmt ", 16, 1, 1, sample_rate, byte_rate, _BYTES_PER_SAMPLE, 16,
        b"data", data_size,
    )  # fmt: skip


class StreamEncoder:
    """Encodes one response's int16 mono PCM incrementally.

    Use one per response: `encode` per chunk, then `finish` once; dropping it unfinished (client gone) frees it.
    Calls are synchronous: pcm/wav/flac cost microseconds, mp3/opus/aac about 0.5-0.8 ms of CPU per 2048-sample
    chunk (~100x realtime per core), cheap enough to call inline from an asyncio handler at modest concurrency.
    """

    def __init__(self, fmt: str, sample_rate: int, output_rate: int | None = None):
        """`sample_rate`: the PCM fed in; `output_rate`: the response's (default: the same, 8 kHz for G.711)."""
        _check_available(fmt)
        _check_sample_rate(sample_rate)
        output_rate = output_rate or (G711_RATE if fmt in _G711_ENCODERS else sample_rate)
        if fmt in _G711_ENCODERS and output_rate != G711_RATE:
            raise UnsupportedFormat(f"{fmt} is 8 kHz telephony audio: leave sample_rate out or send 8000")
        self.fmt = fmt
        self.sample_rate = output_rate
        self._resampler = _Resampler(sample_rate, output_rate) if output_rate != sample_rate else None
        self._pending_header = wav_header(output_rate, None) if fmt == "wav" else b""
        self._av = _AvEncoder(_AV_CODECS[fmt], output_rate, _Sink()) if fmt in _AV_CODECS else None
        self._g711 = _G711Encoder(_G711_ENCODERS[fmt]) if fmt in _G711_ENCODERS else None
        self._is_finished = False

    def encode(self, pcm: bytes) -> bytes:
        """Feed one chunk of int16 little-endian mono samples; return every encoded byte that is ready now.

        The first call also carries the container header. Compressed formats return only whole codec frames,
        so up to one frame plus the encoder's lookahead stays inside the encoder until more audio or `finish`.
        """
        self._check_open()
        _check_pcm(pcm)
        if self._resampler is not None:
            pcm = self._resampler.resample(pcm)
        return self._encode(pcm)

    def _encode(self, pcm: bytes) -> bytes:
        header, self._pending_header = self._pending_header, b""
        if self._g711 is not None:
            return self._g711.encode(pcm)
        if self._av is None:
            return header + bytes(pcm)
        return self._av.encode(pcm)

    def finish(self) -> bytes:
        """Flush the encoder and the container; return the trailing bytes. The encoder is unusable afterwards."""
        self._check_open()
        tail = self._encode(self._resampler.flush()) if self._resampler is not None else b""
        self._is_finished = True
        if self._av is None:
            return tail + self._pending_header
        return tail + self._av.finish()

    def _check_open(self) -> None:
        if self._is_finished:
            raise RuntimeError("this StreamEncoder is finished; create a new one for the next response")


def encode_whole(fmt: str, sample_rate: int, pcm: bytes) -> bytes:
    """A complete file of int16 mono `pcm`, with the exact lengths in its header (WAV sizes, FLAC STREAMINFO,
    MP3 Xing frame) because the whole output is seekable here."""
    _check_available(fmt)
    _check_sample_rate(sample_rate)
    _check_pcm(pcm)
    if fmt == "pcm":
        return bytes(pcm)
    if fmt == "wav":
        return wav_header(sample_rate, len(pcm) // _BYTES_PER_SAMPLE) + bytes(pcm)
    if fmt in _G711_ENCODERS:
        encoder = StreamEncoder(fmt, sample_rate)
        return encoder.encode(pcm) + encoder.finish()
    sink = io.BytesIO()
    encoder = _AvEncoder(_AV_CODECS[fmt], sample_rate, sink)
    encoder.encode(pcm)
    encoder.finish()
    return sink.getvalue()


class _Sink:
    """Write-only, non-seekable byte buffer that ffmpeg writes into and `take` drains.

    Having no seek/tell makes ffmpeg treat the output as a stream: muxers never go back to patch a header.
    """

    def __init__(self):
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def _frame(pcm: bytes, sample_rate: int, pts: int) -> av.AudioFrame:
    samples = np.frombuffer(pcm, dtype="<i2")  # [num_samples]
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = pts
    return frame


class _Resampler:
    """int16 mono PCM from one rate to another through ffmpeg's swresample, incrementally."""

    def __init__(self, input_rate: int, output_rate: int) -> None:
        self._input_rate = input_rate
        self._num_samples = 0
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=output_rate)

    def resample(self, pcm: bytes) -> bytes:
        if not pcm:
            return b""
        frame = _frame(pcm, self._input_rate, self._num_samples)
        self._num_samples += len(pcm) // _BYTES_PER_SAMPLE
        return self._take(frame)

    def flush(self) -> bytes:
        return self._take(None)

    def _take(self, frame: av.AudioFrame | None) -> bytes:
        return _pcm_of(self._resampler.resample(frame))


def _pcm_of(frames: list[av.AudioFrame]) -> bytes:
    """A resampler's int16 mono frames as PCM bytes."""
    return b"".join(frame.to_ndarray().reshape(-1).astype("<i2").tobytes() for frame in frames)


class _G711Encoder:
    """8 kHz int16 mono PCM -> G.711 bytes (ffmpeg's pcm_mulaw or pcm_alaw), a byte a sample."""

    def __init__(self, encoder: str) -> None:
        self._context = av.CodecContext.create(encoder, "w")
        self._context.sample_rate, self._context.layout, self._context.format = G711_RATE, "mono", "s16"
        self._num_samples = 0

    def encode(self, pcm: bytes) -> bytes:
        if not pcm:
            return b""
        frame = _frame(pcm, G711_RATE, self._num_samples)
        self._num_samples += len(pcm) // _BYTES_PER_SAMPLE
        return b"".join(bytes(packet) for packet in self._context.encode(frame))


class _AvEncoder:
    """One PyAV output container with one mono audio stream, writing into `sink`."""

    def __init__(self, codec: _AvCodec, sample_rate: int, sink: _Sink | io.BytesIO):
        self._sink = sink
        self._sample_rate = sample_rate
        self._num_samples = 0  # fed so far; the pts of the next frame, in 1/sample_rate units
        self._container = av.open(
            sink, "w", format=codec.muxer, container_options=codec.muxer_options, buffer_size=_AVIO_BUFFER_BYTES
        )
        self._stream = self._container.add_stream(
            codec.encoder, rate=_encoder_rate(codec.encoder, sample_rate), layout="mono", options=codec.encoder_options
        )
        if codec.bit_rate:
            self._stream.bit_rate = codec.bit_rate
        self._container.start_encoding()  # writes the header now, so the first `encode` returns it

    def encode(self, pcm: bytes) -> bytes:
        if pcm:
            # pts: without it Ogg granule positions come out shifted by the Opus pre-skip
            frame = _frame(pcm, self._sample_rate, self._num_samples)
            self._num_samples += len(pcm) // _BYTES_PER_SAMPLE
            # PyAV's encoder runs every frame through its own AudioResampler to the codec's sample format, rate
            # and fixed frame size, so a rate the codec cannot take (22.05 kHz Opus) is resampled here.
            self._container.mux(self._stream.encode(frame))
        return self._drain()

    def finish(self) -> bytes:
        self._container.mux(self._stream.encode(None))
        self._container.close()  # writes the trailer
        return self._drain()

    def _drain(self) -> bytes:
        if isinstance(self._sink, _Sink):
            return self._sink.take()
        return b""


def _encoder_rate(encoder: str, sample_rate: int) -> int:
    """The source rate if the encoder takes it, else the nearest rate above it (else its highest)."""
    rates = av.codec.Codec(encoder, "w").audio_rates
    if not rates or sample_rate in rates:
        return sample_rate
    higher = [rate for rate in rates if rate > sample_rate]
    return min(higher) if higher else max(rates)


def _check_available(fmt: str) -> None:
    if fmt in available_formats():
        return
    available = ", ".join(available_formats())
    if fmt in FORMATS:
        codec = _AV_CODECS[fmt]
        raise UnsupportedFormat(
            f"response format {fmt!r} is not available here: this ffmpeg build (PyAV) lacks the {codec.encoder!r} "
            f"encoder or the {codec.muxer!r} muxer; choose one of: {available}"
        )
    raise UnsupportedFormat(f"unknown response format {fmt!r}; choose one of: {available}")


def _check_sample_rate(sample_rate: int) -> None:
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")


def _check_pcm(pcm: bytes) -> None:
    if len(pcm) % _BYTES_PER_SAMPLE:
        raise ValueError(
            f"pcm must be whole int16 samples (an even number of bytes), got {len(pcm)} bytes; "
            "pass int16 arrays as array.tobytes()"
        )


def decode_upload(data: bytes, sample_rate: int, max_seconds: float) -> bytes:
    """An uploaded clip in any container ffmpeg reads -> int16 mono PCM at `sample_rate`. ValueError saying
    what is wrong for unreadable, silent-empty or too long audio."""
    pieces = []
    num_samples, limit = 0, int(max_seconds * sample_rate)
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise ValueError("the upload holds no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
            for frame in container.decode(audio=0):
                pieces.append(_pcm_of(resampler.resample(frame)))
                num_samples += len(pieces[-1]) // _BYTES_PER_SAMPLE
                if num_samples > limit:
                    raise ValueError(f"the reference audio is longer than {max_seconds:g} s; send a shorter clip")
            pieces.append(_pcm_of(resampler.resample(None)))
    except av.FFmpegError as error:
        raise ValueError(f"the reference audio could not be decoded ({error}); send wav, flac, mp3 or ogg") from None
    pcm = b"".join(pieces)
    if not pcm:
        raise ValueError("the reference audio holds no samples")
    return pcm

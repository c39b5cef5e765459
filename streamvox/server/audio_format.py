"""Response audio formats: int16 mono PCM -> the bytes one HTTP response streams (never imports torch).

Every encoder here is incremental: `StreamEncoder.encode` returns each byte the container can emit as soon as the
codec has produced it, so a client can start playback while the engine is still generating. pcm and wav are
pure byte framing; mp3, opus (Ogg), flac and aac (ADTS) go through PyAV (ffmpeg) into an in-memory sink that is
drained on every call, so memory per stream stays bounded (a few codec frames), however long the response.
"""

from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass, field

import av
import numpy as np
from av.codec.codec import UnknownCodecError

FORMATS: tuple[str, ...] = ("pcm", "wav", "mp3", "opus", "flac", "aac")

_MEDIA_TYPES = {
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",  # Ogg Opus
    "flac": "audio/flac",
    "aac": "audio/aac",  # ADTS frames
}

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

    def __init__(self, fmt: str, sample_rate: int):
        _check_available(fmt)
        _check_sample_rate(sample_rate)
        self.fmt = fmt
        self.sample_rate = sample_rate
        self._pending_header = wav_header(sample_rate, None) if fmt == "wav" else b""
        self._av = _AvEncoder(_AV_CODECS[fmt], sample_rate, _Sink()) if fmt in _AV_CODECS else None
        self._is_finished = False

    def encode(self, pcm: bytes) -> bytes:
        """Feed one chunk of int16 little-endian mono samples; return every encoded byte that is ready now.

        The first call also carries the container header. Compressed formats return only whole codec frames,
        so up to one frame plus the encoder's lookahead stays inside the encoder until more audio or `finish`.
        """
        self._check_open()
        _check_pcm(pcm)
        header, self._pending_header = self._pending_header, b""
        if self._av is None:
            return header + bytes(pcm)
        return self._av.encode(pcm)

    def finish(self) -> bytes:
        """Flush the encoder and the container; return the trailing bytes. The encoder is unusable afterwards."""
        self._check_open()
        self._is_finished = True
        header, self._pending_header = self._pending_header, b""
        if self._av is None:
            return header
        return self._av.finish()

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
        samples = np.frombuffer(pcm, dtype="<i2")  # [num_samples]
        if samples.size:
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = self._sample_rate
            frame.pts = self._num_samples  # without it Ogg granule positions come out shifted by the Opus pre-skip
            self._num_samples += samples.size
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
                for out in [*resampler.resample(frame)]:
                    samples = out.to_ndarray().reshape(-1)
                    num_samples += samples.size
                    if num_samples > limit:
                        raise ValueError(f"the reference audio is longer than {max_seconds:g} s; send a shorter clip")
                    pieces.append(samples.astype("<i2").tobytes())
            for out in resampler.resample(None):
                pieces.append(out.to_ndarray().reshape(-1).astype("<i2").tobytes())
    except av.FFmpegError as error:
        raise ValueError(f"the reference audio could not be decoded ({error}); send wav, flac, mp3 or ogg") from None
    pcm = b"".join(pieces)
    if not pcm:
        raise ValueError("the reference audio holds no samples")
    return pcm

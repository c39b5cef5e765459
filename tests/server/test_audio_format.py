"""Response audio formats: what a client decodes from the streamed bytes, and when it can start playing."""

import io
import struct
import wave

import av
import numpy as np
import pytest

from streamvox.server.audio_format import (
    FORMATS,
    StreamEncoder,
    UnsupportedFormat,
    available_formats,
    encode_whole,
    media_type,
)

CHUNK_SAMPLES = 2048
LOSSLESS = ("pcm", "wav", "flac")
LOSSY = ("mp3", "opus", "aac")
G711 = ("mulaw", "alaw")
DEMUXERS = {"wav": "wav", "mp3": "mp3", "opus": "ogg", "flac": "flac", "aac": "aac", "mulaw": "mulaw", "alaw": "alaw"}
# (ffmpeg input format names; mulaw and alaw are headerless 8 kHz)
MAX_CODEC_FRAME_SAMPLES = 1152  # longest frame of any format here (MP3 at 32 kHz and above)


def speech_like(sample_rate: int, seconds: float = 1.5) -> np.ndarray:
    """Deterministic, non-periodic test signal: a 440 Hz tone under a 3 Hz envelope, a chirp and a little noise."""
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    tone = (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) * np.sin(2 * np.pi * 440 * t)
    chirp = np.sin(2 * np.pi * (200 * t + 300 * t**2))  # 200 Hz rising to 1100 Hz over 1.5 s
    noise = np.random.default_rng(0).standard_normal(t.size)
    return ((0.2 * tone + 0.4 * chirp + 0.01 * noise) * 32767).astype(np.int16)  # [num_samples]


def stream(fmt: str, sample_rate: int, samples: np.ndarray) -> tuple[list[bytes], bytes]:
    """What one response sends: the bytes returned per `encode` call, and those returned by `finish`."""
    encoder = StreamEncoder(fmt, sample_rate)
    pieces = [encoder.encode(samples[i : i + CHUNK_SAMPLES].tobytes()) for i in range(0, samples.size, CHUNK_SAMPLES)]
    return pieces, encoder.finish()


def decode(fmt: str, data: bytes, sample_rate: int, is_complete: bool = True) -> tuple[np.ndarray, float]:
    """Decode like a client would: (int16 samples resampled to `sample_rate`, decoded duration in seconds).

    A stream cut short (`is_complete=False`) decodes to the audio in its whole frames, or to none if too short to parse.
    """
    if fmt == "pcm":
        samples = np.frombuffer(data, dtype="<i2")
        return samples, samples.size / sample_rate
    resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
    pieces, duration_s = [], 0.0
    try:
        options = {"sample_rate": "8000"} if fmt in G711 else {}  # a headerless stream says nothing of its rate
        with av.open(io.BytesIO(data), format=DEMUXERS[fmt], options=options) as container:
            for frame in container.decode(audio=0):
                duration_s += frame.samples / frame.sample_rate
                pieces += [out.to_ndarray()[0] for out in resampler.resample(frame)]
    except (av.error.InvalidDataError, EOFError):
        if is_complete:
            raise
    pieces += [out.to_ndarray()[0] for out in resampler.resample(None)]
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.int16)), duration_s


def aligned_correlation(reference: np.ndarray, decoded: np.ndarray, max_lag: int) -> float:
    """Pearson correlation of `decoded` with `reference` at the shift (encoder delay) within ±max_lag that fits best."""
    reference, decoded = reference.astype(np.float64), decoded.astype(np.float64)
    n = reference.size + decoded.size
    xcorr = np.fft.irfft(np.fft.rfft(decoded, n) * np.conj(np.fft.rfft(reference, n)), n)  # [n], index = lag mod n
    lags = np.r_[0 : max_lag + 1, -max_lag:0]
    lag = int(lags[np.argmax(xcorr[lags])])
    decoded, reference = (decoded[lag:], reference) if lag >= 0 else (decoded, reference[-lag:])
    m = min(decoded.size, reference.size)
    return float(np.corrcoef(reference[:m], decoded[:m])[0, 1])


def assert_sounds_like(fmt: str, data: bytes, sample_rate: int, samples: np.ndarray) -> None:
    decoded, duration_s = decode(fmt, data, sample_rate)
    if fmt in LOSSLESS:
        np.testing.assert_array_equal(decoded, samples)
        return
    tolerance_s = 0.1 + MAX_CODEC_FRAME_SAMPLES / sample_rate  # encoder priming and end padding
    assert abs(duration_s - samples.size / sample_rate) <= tolerance_s, f"{fmt} decodes to {duration_s:.3f} s"
    correlation = aligned_correlation(samples, decoded, max_lag=sample_rate // 5)
    assert correlation > 0.95, f"{fmt} decodes to audio unlike the input (correlation {correlation:.3f})"


@pytest.mark.parametrize("sample_rate", [24000, 22050, 16000, 44100])
@pytest.mark.parametrize("fmt", available_formats())
def test_streamed_response_decodes_to_the_input(fmt, sample_rate):
    samples = speech_like(sample_rate)
    pieces, tail = stream(fmt, sample_rate, samples)
    assert_sounds_like(fmt, b"".join(pieces) + tail, sample_rate, samples)


def test_streamed_wav_has_unknown_length_and_reads_with_the_wave_module():
    samples = speech_like(24000)
    pieces, tail = stream("wav", 24000, samples)
    data = b"".join(pieces) + tail
    riff_size, data_size = struct.unpack_from("<I", data, 4)[0], struct.unpack_from("<I", data, 40)[0]
    assert (riff_size, data_size) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert len(pieces[0]) == 44 + 2 * CHUNK_SAMPLES
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24000)
        read = np.frombuffer(wav.readframes(samples.size + 1000), dtype="<i2")
    np.testing.assert_array_equal(read, samples)


@pytest.mark.parametrize("sample_rate", [24000, 44100])
@pytest.mark.parametrize("fmt", available_formats())
def test_audio_is_playable_while_streaming(fmt, sample_rate):
    """A client can start playing within 0.5 s of audio, and is never more than 0.25 s behind what was fed."""
    samples = speech_like(sample_rate)
    encoder = StreamEncoder(fmt, sample_rate)
    sent, num_fed, first_playable = b"", 0, None
    for start in range(0, samples.size, CHUNK_SAMPLES):
        chunk = samples[start : start + CHUNK_SAMPLES]
        sent += encoder.encode(chunk.tobytes())
        num_fed += chunk.size
        _, playable_s = decode(fmt, sent, sample_rate, is_complete=False)
        if playable_s > 0 and first_playable is None:
            first_playable = num_fed
        if first_playable is not None:
            behind_s = num_fed / sample_rate - playable_s
            assert behind_s <= 0.25, f"{fmt} holds back {behind_s:.3f} s of audio after {num_fed} samples"
    assert first_playable is not None and first_playable <= sample_rate // 2, f"{fmt} first plays at {first_playable}"


@pytest.mark.parametrize("fmt", [fmt for fmt in available_formats() if fmt not in ("pcm", "wav")])
def test_compressed_formats_send_fewer_bytes_than_pcm_from_the_first_chunk(fmt):
    samples = speech_like(24000)
    pieces, _ = stream(fmt, 24000, samples)
    assert 0 < len(pieces[0]) < 2 * CHUNK_SAMPLES, f"{fmt} header + first chunk is {len(pieces[0])} bytes"


@pytest.mark.parametrize("fmt", available_formats())
def test_whole_file_decodes_to_the_input(fmt):
    samples = speech_like(24000)
    assert_sounds_like(fmt, encode_whole(fmt, 24000, samples.tobytes()), 24000, samples)


def test_whole_wav_header_has_exact_sizes():
    samples = speech_like(24000)
    data = encode_whole("wav", 24000, samples.tobytes())
    assert struct.unpack_from("<4sI4s", data, 0) == (b"RIFF", 36 + 2 * samples.size, b"WAVE")
    assert struct.unpack_from("<4sI", data, 36) == (b"data", 2 * samples.size)
    assert len(data) == 44 + 2 * samples.size
    with wave.open(io.BytesIO(data)) as wav:
        assert wav.getnframes() == samples.size


def test_pcm_streams_bytes_through_untouched():
    encoder = StreamEncoder("pcm", 24000)
    assert encoder.encode(b"\x01\x00\xff\x7f") == b"\x01\x00\xff\x7f"
    assert encoder.finish() == b""


def test_media_types():
    expected = {
        "pcm": "audio/pcm",
        "wav": "audio/wav",
        "mp3": "audio/mpeg",
        "opus": "audio/ogg",
        "flac": "audio/flac",
        "aac": "audio/aac",
        "mulaw": "audio/basic",
        "alaw": "audio/x-alaw-basic",
    }
    assert {fmt: media_type(fmt) for fmt in available_formats()} == {fmt: expected[fmt] for fmt in available_formats()}


def test_pcm_and_wav_are_always_available_and_every_format_is_known():
    assert {"pcm", "wav"} <= set(available_formats()) <= set(FORMATS)


@pytest.mark.parametrize("call", [lambda: StreamEncoder("vorbis", 24000), lambda: media_type("vorbis")])
def test_unknown_format_is_rejected_with_the_choices(call):
    with pytest.raises(UnsupportedFormat) as error:
        call()
    assert isinstance(error.value, ValueError)  # the HTTP layer answers 400
    assert "'vorbis'" in str(error.value)
    for fmt in available_formats():
        assert fmt in str(error.value)


def test_bad_input_is_rejected_with_what_to_change():
    with pytest.raises(ValueError, match="even number of bytes"):
        StreamEncoder("wav", 24000).encode(b"\x00\x00\x00")
    with pytest.raises(ValueError, match="positive number of Hz"):
        StreamEncoder("mp3", 0)
    encoder = StreamEncoder("opus", 24000)
    encoder.finish()
    with pytest.raises(RuntimeError, match="create a new one"):
        encoder.encode(b"\x00\x00")


@pytest.mark.parametrize("output_rate", [8000, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize("fmt", ["pcm", "wav", "flac", "mp3"])
def test_a_response_at_another_rate_is_the_same_audio_resampled(fmt, output_rate):
    samples = speech_like(24000)
    encoder = StreamEncoder(fmt, 24000, output_rate)
    pieces = [encoder.encode(samples[i : i + CHUNK_SAMPLES].tobytes()) for i in range(0, samples.size, CHUNK_SAMPLES)]
    data = b"".join(pieces) + encoder.finish()
    assert encoder.sample_rate == output_rate
    if fmt == "wav":
        with wave.open(io.BytesIO(data)) as wav:
            assert wav.getframerate() == output_rate
    decoded, duration_s = decode(fmt, data, output_rate)
    padding_s = 2 * MAX_CODEC_FRAME_SAMPLES / output_rate if fmt in LOSSY else 0.0  # encoder priming, end padding
    assert abs(duration_s - 1.5) <= 0.01 + padding_s, duration_s  # as long as the input: nothing dropped or repeated
    resampler = av.AudioResampler(format="s16", layout="mono", rate=output_rate)
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 24000
    expected = np.concatenate([out.to_ndarray()[0] for out in [*resampler.resample(frame), *resampler.resample(None)]])
    assert aligned_correlation(expected, decoded, max_lag=output_rate // 5) > 0.95
    if fmt in ("pcm", "wav"):  # the resampler holds back no more than its filter's few samples
        assert all(abs(len(piece) - 2 * CHUNK_SAMPLES * output_rate / 24000) < 100 for piece in pieces[1:-1])


def test_telephony_formats_are_8_khz_bytes_a_sample():
    samples = speech_like(24000)
    for fmt in G711:
        pieces, tail = stream(fmt, 24000, samples)
        assert abs(sum(map(len, pieces)) + len(tail) - samples.size // 3) <= 2  # 8 kHz, one byte a sample
        with pytest.raises(UnsupportedFormat, match="8 kHz"):
            StreamEncoder(fmt, 24000, 16000)
    known = np.array([0, 32767, -32768, 1000], np.int16).tobytes()  # G.711's code words (as the stdlib's audioop)
    assert StreamEncoder("mulaw", 8000).encode(known) == bytes([0xFF, 0x80, 0x00, 0xCE])
    assert StreamEncoder("alaw", 8000).encode(known) == bytes([0xD5, 0xAA, 0x2A, 0xFA])

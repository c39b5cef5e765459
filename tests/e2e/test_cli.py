"""`streamvox synth` and `streamvox make-tiny` as a user runs them: real processes, real files."""

import re
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch


def run_cli(*args, env_cache):
    return subprocess.run(
        [sys.executable, "-m", "streamvox.cli", *args], capture_output=True, text=True, timeout=300,
        env={"STREAMVOX_CACHE": str(env_cache), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )


def files_under(directory):
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def test_synth_builds_the_tiny_default_and_writes_a_24khz_mono_wav(tmp_path):
    out = tmp_path / "hello.wav"
    done = run_cli("synth", "Hello there, this is a test.", "-o", str(out), "--seed", "3", "--max-tokens", "91",
                   env_cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "random weights" in done.stderr and "noise" in done.stderr  # the user is told it is not speech
    assert (tmp_path / "cache" / "tiny-orpheus" / "config.json").exists()  # built on first use
    num_frames = int(re.search(r"(\d+) frames", done.stdout).group(1))
    assert num_frames > 0
    with wave.open(str(out)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24000)
        assert wav.getnframes() == num_frames * 2048
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
    assert np.abs(pcm).max() > 100  # audible signal, not silence


@pytest.mark.parametrize("flags, says", [
    (["--voice", "nobody"], ["unknown voice 'nobody'", "tara"]),  # the choices are named
    pytest.param(["--device", "cuda"], ["no CUDA GPU", "--device cpu"],  # what to do instead
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="for machines without a GPU")),
])
def test_synth_refuses_bad_options_saying_what_to_do(tmp_path, flags, says):
    done = run_cli("synth", "hi", *flags, "-o", str(tmp_path / "x.wav"), env_cache=tmp_path)
    assert done.returncode == 2
    assert all(fragment in done.stderr for fragment in says), done.stderr
    assert "Traceback" not in done.stderr


def test_make_tiny_writes_the_publisher_layout(tmp_path):
    done = run_cli("make-tiny", "orpheus", str(tmp_path / "ckpt"), "--shards", "2", env_cache=tmp_path)
    assert done.returncode == 0, done.stderr
    names = files_under(tmp_path / "ckpt")
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "snac_24khz/config.json", "snac_24khz/pytorch_model.bin"} <= names


def test_make_tiny_full_writes_a_config_and_no_weights(tmp_path):
    done = run_cli("make-tiny", "orpheus", str(tmp_path / "full"), "--size", "full", env_cache=tmp_path)
    assert done.returncode == 0, done.stderr
    assert files_under(tmp_path / "full") == {"config.json", "tokenizer.json", "snac_24khz/config.json"}

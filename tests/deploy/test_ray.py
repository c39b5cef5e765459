"""Scale-out on Ray, run in a private network namespace (Ray's services listen on every interface): Ray Serve
replicas behind the same HTTP API, and the offline batch on Ray Data."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the Ray tests need the ray extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[2]
LEFTOVERS = ("raylet", "gcs_server", "ray::", "streamvox.engine.process", "default_worker.py")


def _namespace_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _namespace_works(), reason="needs `unshare -n` (root, or user namespaces)")


def in_namespace(command: str, **options) -> subprocess.Popen:
    """`command` in a new network namespace with only its loopback up."""
    return subprocess.Popen(["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {command}"], cwd=ROOT,
                            **options)


def leftovers() -> list[str]:
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in listing if any(name in line for name in LEFTOVERS)]


def wait_for_no_leftovers(timeout_s: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (found := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def test_two_ray_serve_replicas_stream_what_the_engine_makes_and_shut_down_clean(tiny_dir, reference, same_audio,
                                                                                    tmp_path):
    """Eight concurrent streams through the official openai client and a WebSocket sentence, each equal to the
    in-process engine's audio for its seed; then serve.shutdown and ray.shutdown leave no process behind."""
    assert not leftovers(), leftovers()
    process = in_namespace(f"{sys.executable} tests/deploy/ray_serve_scenario.py {tiny_dir} {tmp_path}",
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ready"] and summary["replicas"] == {"RUNNING": 2}, summary
    assert "tara" in summary["voices"]["voices"]
    for seed in range(8):
        assert same_audio((tmp_path / f"{seed}.pcm").read_bytes(),
                          reference("Keep talking while things break around you.", seed, 140)), seed
    assert same_audio((tmp_path / "ws.pcm").read_bytes(), reference("Something else.", 20, 70)), "WebSocket"
    assert not wait_for_no_leftovers(), leftovers()
    assert summary["total_s"] < 240, summary


def _texts(path: Path, count: int) -> Path:
    lines = [json.dumps({"id": f"item-{i:03d}", "text": f"Sentence number {i} for the batch.", "max_tokens": 28,
                         "seed": i}) for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_hundred_lines_on_ray_data_make_the_local_files_and_an_interrupted_run_resumes(tiny_dir, tmp_path,
                                                                                         same_audio):
    """The same WAV files as the local batch: same header and length, samples equal up to the last bit that
    batching moves (the engine actors batch other lines together than the local engine does)."""
    from streamvox.jobs import run_batch

    texts = _texts(tmp_path / "texts.jsonl", 100)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    with open(tmp_path / "local.log", "w") as log:
        run_batch(str(texts), str(local), str(tiny_dir), stream=log)
    command = f"{sys.executable} -m streamvox.cli batch {texts} --out {on_ray} --model {tiny_dir} --ray --engines 2"
    first = in_namespace(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    manifest = on_ray / "manifest.jsonl"
    deadline = time.monotonic() + 240
    while not (manifest.exists() and len(manifest.read_text().splitlines()) >= 16):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-4000:]
        time.sleep(0.1)
    first.terminate()  # the shell exec'd python: the driver stops between two files and shuts Ray down
    _, errors = first.communicate(timeout=60)
    assert first.returncode == 130 and "run the same command again to resume" in errors, errors[-2000:]
    done_first = len(manifest.read_text().splitlines())
    assert 16 <= done_first < 100 and not wait_for_no_leftovers(), leftovers()

    second = in_namespace(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, errors = second.communicate(timeout=300)
    assert second.returncode == 0, errors[-4000:]
    assert f"{100 - done_first} written, {done_first} already done" in errors, errors[-2000:]
    files = sorted(p.name for p in local.glob("*.wav"))
    assert len(files) == 100 and sorted(p.name for p in on_ray.glob("*.wav")) == files
    for name in files:
        got, expected = (on_ray / name).read_bytes(), (local / name).read_bytes()
        assert got[:44] == expected[:44] and same_audio(got[44:], expected[44:]), name
    records = {json.loads(line)["id"]: json.loads(line) for line in manifest.read_text().splitlines()}
    local_lines = (local / "manifest.jsonl").read_text().splitlines()
    expected = {json.loads(line)["id"]: json.loads(line) for line in local_lines}
    assert records == expected
    assert not wait_for_no_leftovers(), leftovers()


def test_serve_run_arguments_reach_the_configs_and_unknown_ones_are_refused():
    from ray.serve import Application

    from streamvox.deploy.ray_serve import build

    app = build({"model": "tiny-orpheus", "max_queue_wait_s": "5", "data_parallel": "2", "cuda_graphs": "false",
                 "min_replicas": "1", "max_replicas": "4", "target_streams": "6"})
    assert isinstance(app, Application)
    deployment = app._bound_deployment
    engine, server = deployment.init_args
    assert engine.model == "tiny-orpheus" and engine.scheduler.max_queue_wait_s == 5.0 and engine.cuda_graphs is False
    assert server.data_parallel == 2
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 6.0)
    with pytest.raises(ValueError, match="unknown options \\['replicas'\\]"):
        build({"model": "tiny-orpheus", "replicas": "2"})

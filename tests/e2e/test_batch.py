"""`streamvox batch`: a JSONL file of texts to audio files and a manifest; bad lines skipped; reruns resume."""

import json
import subprocess
import sys
import wave


def run_batch(texts, out, model):
    command = [sys.executable, "-m", "streamvox.cli", "batch", str(texts), "--out", str(out), "--model", str(model)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_fifty_texts_with_one_bad_line_make_49_files_and_a_rerun_does_no_work(tiny_dir, tmp_path):
    texts, out = tmp_path / "texts.jsonl", tmp_path / "out"
    lines = [json.dumps({"id": f"item-{i:02d}", "text": f"Sentence number {i} for the batch.", "max_tokens": 28,
                         "seed": i}) for i in range(50)]
    lines[17] = '{"id": "broken", "text": "no closing brace"'
    texts.write_text("\n".join(lines) + "\n")

    first = run_batch(texts, out, tiny_dir)
    assert first.returncode == 0, first.stderr
    assert "line 18 skipped: not valid JSON" in first.stderr
    files = sorted(p.name for p in out.glob("*.wav"))
    assert len(files) == 49 and "item-17.wav" not in files
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in manifest) == files
    with wave.open(str(out / "item-03.wav")) as audio:  # a real, complete WAV of the recorded length
        assert audio.getframerate() == 24000
        record = next(r for r in manifest if r["id"] == "item-03")
        assert audio.getnframes() > 0 and abs(audio.getnframes() / 24000 - record["audio_s"]) <= 0.0005  # ms
    assert json.loads((out / "rejected.jsonl").read_text())["line"] == 18

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.wav")}
    second = run_batch(texts, out, tiny_dir)
    assert second.returncode == 0 and "0 written, 49 already done" in second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.wav")} == stamps
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 49

    (out / "item-05.wav").unlink()  # a lost file is made again, and only it
    third = run_batch(texts, out, tiny_dir)
    assert "1 written, 48 already done" in third.stderr and (out / "item-05.wav").exists()

    lines[9] = json.dumps({"id": "item-09", "text": "An edited sentence.", "max_tokens": 28, "seed": 9})
    texts.write_text("\n".join(lines) + "\n")  # an item whose text changed is made again, and only it
    fourth = run_batch(texts, out, tiny_dir)
    assert "1 written, 48 already done" in fourth.stderr

"""`streamvox batch TEXTS.jsonl --out DIR`: a list of texts to audio files, as fast as the machine allows.

Each input line is a JSON object: `text` (required), and optionally `id` (the file name; default `line-N`),
`voice`, `seed`, `max_tokens`. Every valid item is submitted to one in-process engine with the offline policy
(throughput first, no deadlines). A finished item is written to DIR/<id>.<format> (through a temporary file,
so a file that exists is complete) and then recorded in DIR/manifest.jsonl. A rerun skips every id already in
the manifest with the same text and format whose file exists, so an interrupted batch resumes where it
stopped. Bad lines (not JSON, no text, unknown voice, bad numbers, a repeated id) are reported on stderr and in
DIR/rejected.jsonl and skipped;
an item the engine fails on is reported and the rest go on. With `--ray` the same run goes through Ray Data
(streamvox/deploy/ray_data.py), which uses the pieces below.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from streamvox.audio import to_int16
from streamvox.config import CacheConfig, SchedulerConfig
from streamvox.engine.local import Engine
from streamvox.runner.device import resolve_device
from streamvox.server.audio_format import available_formats, encode_whole

EXTENSIONS = {"opus": "ogg"}
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Item:
    item_id: str
    text: str
    voice: str | None
    sampling: object  # SamplingParams, resolved by the engine's checks


@dataclass
class Plan:
    """What a batch run has to do: every line read, the bad ones, and the records not yet done."""

    out: Path
    fmt: str
    records: list[tuple[int, dict]]  # (line number, record) of every well-formed line
    rejected: list[dict]
    todo: list[tuple[int, dict]]

    @property
    def manifest_path(self) -> Path:
        return self.out / "manifest.jsonl"

    @property
    def num_skipped(self) -> int:
        return len(self.records) - len(self.todo)


def plan_batch(texts_path: str, out_dir: str, fmt: str, stream) -> Plan:
    """Read the lines and the manifest of earlier runs (no model needed)."""
    if fmt not in available_formats():
        raise ValueError(f"unknown or unavailable format {fmt!r}; use one of {', '.join(available_formats())}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = _finished(out / "manifest.jsonl", out, fmt)
    records, rejected = _read_records(Path(texts_path))
    todo = [r for r in records if done.get(r[1]["id"]) != r[1]["text"]]
    if len(records) > len(todo):
        print(f"resuming: {len(records) - len(todo)} of {len(records)} items are already done", file=stream)
    return Plan(out, fmt, records, rejected, todo)


def offline_engine(model: str, max_num_seqs: int = 32, device: str = "auto", dtype: str = "auto",
                   attention: str = "auto", cuda_graphs: bool = True) -> Engine:
    """An in-process engine with the offline policy (throughput first, no deadlines)."""
    is_cuda = resolve_device(device).type == "cuda"  # a GPU's KV cache takes its share of the memory
    engine = Engine.from_pretrained(model, device=device, dtype=dtype, scheduler=SchedulerConfig(
        policy="offline", max_num_seqs=max_num_seqs, max_queue_len=1_000_000, max_num_batched_tokens=2048),
        cache=CacheConfig(kv_cache_mb=0 if is_cuda else 1024), attention=attention, cuda_graphs=cuda_graphs)
    engine.lm_runner.capture_graphs()  # CUDA: decode steps replay graphs (no warm-up: no cost model needed)
    return engine


def run_batch(texts_path: str, out_dir: str, model: str = "tiny-orpheus", fmt: str = "wav",
              max_num_seqs: int = 32, stream=sys.stderr, device: str = "auto", dtype: str = "auto",
              attention: str = "auto", cuda_graphs: bool = True) -> dict:
    plan = plan_batch(texts_path, out_dir, fmt, stream)
    engine, todo = None, []
    if plan.todo:  # nothing to do: no model to load
        engine = offline_engine(model, max_num_seqs, device, dtype, attention, cuda_graphs)
        for number, record in plan.todo:
            try:
                todo.append(_item(record, engine))
            except ValueError as error:
                plan.rejected.append({"line": number, "error": str(error), "content": json.dumps(record)[:200]})
    write_rejected(plan, stream)
    progress = Progress(len(todo), stream)
    failed = []
    if todo:
        with open(plan.manifest_path, "a", encoding="utf-8") as manifest:
            for item, result, error in generate(engine, todo):
                if result is None:
                    failed.append(item.item_id)
                    progress.report(f"item {item.item_id!r} failed: {error}")
                else:
                    store(plan, manifest, *encode_item(item, result, fmt), progress)
    if engine is not None:
        engine.close()
    return summarize(plan, progress, failed, stream)


def write_rejected(plan: Plan, stream) -> None:
    _write_rejected(plan.out / "rejected.jsonl", sorted(plan.rejected, key=lambda r: r["line"]), stream)


def store(plan: Plan, manifest, name: str, data: bytes, record: dict, progress: Progress) -> None:
    """Write one item's file (through a temporary file: a file that exists is complete), then its manifest line."""
    temporary = plan.out / f".{name}.partial"
    temporary.write_bytes(data)
    os.replace(temporary, plan.out / name)
    manifest.write(json.dumps(record) + "\n")
    manifest.flush()
    progress.advance(record["audio_s"])


def summarize(plan: Plan, progress: Progress, failed: list[str], stream) -> dict:
    progress.finish()
    summary = {"items": len(plan.records), "written": progress.num_done, "skipped": plan.num_skipped,
               "rejected": len(plan.rejected), "failed": len(failed), "audio_s": round(progress.audio_s, 2),
               "wall_s": round(progress.elapsed_s, 2)}
    print(f"done: {summary['written']} written, {plan.num_skipped} already done, {len(plan.rejected)} rejected "
          f"lines, {len(failed)} failed; manifest: {plan.manifest_path}", file=stream)
    return summary


def _read_records(path: Path) -> tuple[list[tuple[int, dict]], list[dict]]:
    """(line number, record with its id) of every well-formed line, and the rejected lines."""
    records, rejected, seen = [], [], set()
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = _parse(line, number)
                if record["id"] in seen:
                    raise ValueError(f"id {record['id']!r} appears twice; ids name the output files")
                seen.add(record["id"])
                records.append((number, record))
            except ValueError as error:
                rejected.append({"line": number, "error": str(error), "content": line.strip()[:200]})
    return records, rejected


def _parse(line: str, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise ValueError('each line must be a JSON object such as {"id": "intro", "text": "Hello."}')
    unknown = set(record) - {"id", "text", "voice", "seed", "max_tokens"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; use id, text, voice, seed, max_tokens")
    record["id"] = str(record.get("id", f"line-{number}"))
    if not isinstance(record.get("text"), str):
        raise ValueError("`text` is missing or not a string")
    if not SAFE_ID.match(record["id"]):
        raise ValueError(f"id {record['id']!r} is not a safe file name (letters, digits, . _ -, at most 128)")
    if not all(isinstance(record[k], int) and not isinstance(record[k], bool)
               for k in ("seed", "max_tokens") if k in record):
        raise ValueError("seed and max_tokens must be integers")
    return record


def _item(record: dict, engine: Engine) -> Item:
    """Checks that need the model: voice and sampling limits."""
    return checked_item(record, engine.check_request)


def checked_item(record: dict, check) -> Item:
    """The record as an Item, its sampling resolved by `check(text, voice, overrides)` (ValueError: bad)."""
    overrides = {k: record[k] for k in ("seed", "max_tokens") if k in record}
    sampling = check(record["text"], record.get("voice"), overrides)
    return Item(record["id"], record["text"], record.get("voice"), sampling)


def generate(engine: Engine, todo: list[Item], prepared: list | None = None) -> Iterator[tuple[Item, object, str]]:
    """(item, its SpeechResult or None, why it failed) as each finishes; `prepared`: each item's prompt, made
    beforehand (else the engine prepares it)."""
    by_request = {}
    for index, item in enumerate(todo):
        try:
            if prepared is None:
                request_id = engine.submit(item.text, item.voice, item.sampling)
            else:
                request_id = engine.submit_prepared(prepared[index], item.sampling)
            by_request[request_id] = item
        except ValueError as error:  # e.g. a prompt longer than the model's context
            yield item, None, str(error)
    while by_request:
        events = engine.step()
        for failure in events.failures:
            item = by_request.pop(failure.request_id, None)
            if item is not None:
                engine.cancel(failure.request_id)
                yield item, None, failure.message
        for chunk in events.chunks:
            if chunk.is_last and chunk.request_id in by_request:
                yield by_request.pop(chunk.request_id), engine.result(chunk.request_id), ""


def encode_item(item: Item, result, fmt: str) -> tuple[str, bytes, dict]:
    """(file name, encoded audio, manifest record) of a finished item."""
    name = f"{item.item_id}.{EXTENSIONS.get(fmt, fmt)}"
    data = encode_whole(fmt, result.sample_rate, to_int16(result.pcm).tobytes())
    return name, data, {"id": item.item_id, "file": name, "text": item.text, "voice": item.voice,
                        "seed": item.sampling.seed, "audio_s": round(len(result.pcm) / result.sample_rate, 3),
                        "sample_rate": result.sample_rate, "num_tokens": len(result.step_tokens),
                        "finish_reason": result.finish_reason}


def _finished(manifest_path: Path, out: Path, fmt: str) -> dict[str, str]:
    """id -> text of every item done in this format whose file is still there (a changed text is redone)."""
    if not manifest_path.exists():
        return {}
    done = {}
    for line in manifest_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            if record["file"].endswith(f".{fmt}") and (out / record["file"]).exists():
                done[record["id"]] = record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut off by a crash: its item is simply done again
    return done


def _write_rejected(path: Path, rejected: list[dict], stream) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rejected), encoding="utf-8")
    for r in rejected:
        print(f"line {r['line']} skipped: {r['error']}", file=stream)


class Progress:
    """One status line: items, audio seconds, x real-time, ETA (redrawn in place on a terminal)."""

    def __init__(self, total: int, stream) -> None:
        self.total, self.stream = total, stream
        self.num_done, self.audio_s = 0, 0.0
        self.started = time.perf_counter()
        self.is_tty = getattr(stream, "isatty", lambda: False)()
        self._draw()

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def advance(self, audio_s: float) -> None:
        self.num_done += 1
        self.audio_s += audio_s
        self._draw()

    def report(self, message: str) -> None:
        print(("\n" if self.is_tty else "") + message, file=self.stream)
        self._draw()

    def finish(self) -> None:
        if self.is_tty and self.total:
            print(file=self.stream)

    def _draw(self) -> None:
        if not self.total:
            return  # nothing to do: no bar
        elapsed = self.elapsed_s
        width = 24
        filled = width * self.num_done // max(1, self.total)
        eta = f"{elapsed / self.num_done * (self.total - self.num_done):.0f} s" if self.num_done else "-"
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.num_done}/{self.total} items, "
                f"{self.audio_s:.1f} s audio, {self.audio_s / max(elapsed, 1e-9):.1f}x real-time, ETA {eta}")
        print(("\r" + line) if self.is_tty else line, end="" if self.is_tty else "\n", file=self.stream, flush=True)

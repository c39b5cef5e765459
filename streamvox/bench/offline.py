"""Offline throughput: N requests at once through the engine, beside the naive baseline and the raw model.

- **naive**: the `--engine naive` pipeline (transformers `generate` + the snac package, one request at a time).
- **streamvox**: the in-process engine with the offline policy, all N requests submitted together. The time
  split is the engine's own LM step time and codec time (the codec runs on its own thread, beside the LM).
- **raw model**: the LM forward + sampling and the codec decode called directly, with no scheduler, server or
  engine loop, at the same batch size: N rows for N x max_tokens steps' worth of tokens, then every frame
  through the codec in calls of N windows (or of the engine's codec batch, if that is faster). Its throughput
  is that of the slower stage, as if the two ran side by side on their own cores without a moment lost: the
  best any engine could do with this model on this machine. Engine efficiency = streamvox / raw.

Every request generates exactly `max_tokens` tokens (the stop token is ignored), so the work is identical.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from streamvox.batch import NewRequest, ScheduledRow, StepBatch
from streamvox.config import CacheConfig, EngineConfig, SchedulerConfig
from streamvox.engine.local import Engine
from streamvox.models.base import ChunkJob
from streamvox.runner.lm_runner import LMRunner
from streamvox.runner.weights import load_model

TEXT = "The quick brown fox jumps over the lazy dog while the radio plays a song."
NAIVE_REQUESTS = 3  # the baseline runs requests one by one: its rate does not depend on how many


def run_offline(model_name: str, batch_sizes: list[int], max_tokens: int, out_dir: str, device: str = "auto",
                dtype: str = "auto") -> list[dict]:
    from streamvox.engine.naive import FAMILIES as NAIVE_FAMILIES

    model = load_model(model_name, dtype=dtype, device=device)
    sampling = model.default_sampling.replace(max_tokens=max_tokens, ignore_eos=True)
    _print_header(model_name, max_tokens)
    rows = []
    naive = None
    if model.family in NAIVE_FAMILIES:
        naive = _naive(model_name, sampling, device, dtype)
        rows.append(naive)
        _print_row(naive, naive)
    for batch_size in batch_sizes:
        rows.append(_engine(model_name, model, sampling, batch_size, device, dtype))
        _print_row(rows[-1], naive)
        rows.append(_raw(model, sampling, batch_size, rows[-1]))
        _print_row(rows[-1], naive)
    _report(rows, out_dir, {"model": model_name, "max_tokens": max_tokens, "batch_sizes": batch_sizes,
                            "threads": torch.get_num_threads()})
    return rows


def _engine(model_name: str, model, sampling, batch_size: int, device: str, dtype: str) -> dict:
    config = EngineConfig(model=model_name, device=device, dtype=dtype, cache=CacheConfig(kv_cache_mb=512),
                          scheduler=SchedulerConfig(policy="offline", max_num_seqs=batch_size,
                                                    max_num_batched_tokens=2048))
    engine = Engine(model, config)
    engine.generate([TEXT], sampling=sampling.replace(max_tokens=28))  # warm-up
    lm_before, codec_before = engine.lm_busy_s, engine.codec.busy_s
    started = time.perf_counter()
    results = engine.generate([TEXT] * batch_size, sampling=sampling)
    wall_s = time.perf_counter() - started
    engine.close()
    audio_s = sum(len(r.pcm) for r in results) / model.timing.sample_rate
    return _row("streamvox", batch_size, batch_size * sampling.max_tokens, audio_s, wall_s,
                lm_s=engine.lm_busy_s - lm_before, codec_s=engine.codec.busy_s - codec_before)


def _naive(model_name: str, sampling, device: str, dtype: str) -> dict:
    from streamvox.engine.naive import NaiveEngine, _Job
    from streamvox.protocol import Audio

    naive = NaiveEngine(EngineConfig(model=model_name, engine="naive", device=device, dtype=dtype))
    naive.warm_up()
    prompt = naive.model.prepare(TEXT, None)
    messages: list = []
    started = time.perf_counter()
    for seed in range(NAIVE_REQUESTS):
        naive.generate(_Job(f"naive-{seed}", prompt, sampling.replace(seed=seed)), messages.append)
    wall_s = time.perf_counter() - started
    samples = sum(len(m.pcm) // 2 for m in messages if isinstance(m, Audio))
    return _row("naive (transformers + snac, one at a time)", 1, NAIVE_REQUESTS * sampling.max_tokens,
                samples / naive.model.timing.sample_rate, wall_s)


@torch.inference_mode()
def _raw(model, sampling, batch_size: int, engine_row: dict) -> dict:
    """LM steps and codec calls straight on the model, timed apart (see the module docstring)."""
    block_size, prompt = 16, tuple(model.prepare(TEXT, None))
    blocks_per_row = -(-(len(prompt) + sampling.max_tokens) // block_size)
    runner = LMRunner(model, batch_size * blocks_per_row, block_size, model.dtype)
    tables = [tuple(range(i * blocks_per_row, (i + 1) * blocks_per_row)) for i in range(batch_size)]
    new = tuple(NewRequest(f"r{i}", prompt, sampling.replace(seed=i), 0) for i in range(batch_size))
    prefill = tuple(ScheduledRow(f"r{i}", 0, len(prompt), tables[i], True) for i in range(batch_size))
    builders = [model.new_frame_builder() for _ in range(batch_size)]
    frames: list[list[tuple[int, ...]]] = [[] for _ in range(batch_size)]
    started = time.perf_counter()
    output = runner.execute(StepBatch(new, prefill, ()))
    for step in range(sampling.max_tokens):
        for i, token in enumerate(output.step_tokens):  # rows come back in request order
            if (frame := builders[i].push(token)) is not None:
                frames[i].append(frame)
        if step + 1 < sampling.max_tokens:
            position = len(prompt) + step
            rows = tuple(ScheduledRow(f"r{i}", position, 1, tables[i], True) for i in range(batch_size))
            output = runner.execute(StepBatch((), rows, ()))
    lm_s = time.perf_counter() - started
    builder_frames = [torch.tensor(f, dtype=torch.int64) for f in frames]
    codec_s = min(_codec_time(model, builder_frames, per_call) for per_call in {batch_size, min(batch_size, 8)})
    num_tokens = batch_size * sampling.max_tokens
    audio_s = sum(len(f) for f in builder_frames) * model.timing.samples_per_frame / model.timing.sample_rate
    row = _row("raw model (LM and codec alone)", batch_size, num_tokens, audio_s, max(lm_s, codec_s),
               lm_s=lm_s, codec_s=codec_s)
    row["engine_efficiency"] = round(engine_row["tokens_per_s"] / row["tokens_per_s"], 3)
    return row


def _codec_time(model, frames_per_request: list[torch.Tensor], per_call: int) -> float:
    """Decode every frame of every request in the family's chunks, chunk by chunk across requests (so a stateful
    codec gets each request's chunks in order), `per_call` chunks a call."""
    states = [model.new_codec_state(None, seed) for seed in range(len(frames_per_request))]
    jobs = []
    for start, end in _chunks(model.chunking, max(map(len, frames_per_request))):
        for seed, frames in enumerate(frames_per_request):
            if start < len(frames):
                stop = min(end, len(frames))
                jobs.append(ChunkJob(frames, start, stop, stop == len(frames), seed, states[seed]))
    started = time.perf_counter()
    for start in range(0, len(jobs), per_call):
        model.decode_chunks(jobs[start:start + per_call])
    elapsed = time.perf_counter() - started
    for state in states:
        model.release_codec_state(state)
    return elapsed


def _chunks(chunking, num_frames: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of a request of `num_frames` frames under `chunking`."""
    ends = [min(chunking.first_chunk_frames, num_frames)]
    while ends[-1] < num_frames:
        ends.append(min(ends[-1] + chunking.frames_per_chunk, num_frames))
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _row(system: str, batch_size: int, tokens: int, audio_s: float, wall_s: float, lm_s: float | None = None,
         codec_s: float | None = None) -> dict:
    row = {"system": system, "batch_size": batch_size, "tokens": tokens, "audio_s": round(audio_s, 2),
           "wall_s": round(wall_s, 3), "tokens_per_s": round(tokens / wall_s, 1),
           "x_real_time": round(audio_s / wall_s, 2)}
    if lm_s is not None:
        row.update(lm_s=round(lm_s, 3), codec_s=round(codec_s, 3))
    return row


def _print_header(model_name: str, max_tokens: int) -> None:
    print(f"offline throughput on {model_name}, {max_tokens} tokens per request, {torch.get_num_threads()} "
          "torch threads")
    print(f"{'system':<44}{'batch':>6}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'x RT':>8}{'LM s':>8}{'codec s':>9}"
          f"{'vs naive':>9}{'efficiency':>11}")


def _print_row(row: dict, naive: dict | None) -> None:
    row["x_naive"] = round(row["x_real_time"] / naive["x_real_time"], 2) if naive else ""
    print(f"{row['system']:<44}{row['batch_size']:>6}{row['tokens']:>8}{row['wall_s']:>9}{row['tokens_per_s']:>9}"
          f"{row['x_real_time']:>8}{row.get('lm_s', ''):>8}{row.get('codec_s', ''):>9}{row['x_naive']:>9}"
          f"{row.get('engine_efficiency', ''):>11}", flush=True)


def _report(rows: list[dict], out_dir: str, meta: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "offline.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for system, style in [("streamvox", "o-"), ("raw model", "s--")]:
        points = [(r["batch_size"], r["x_real_time"]) for r in rows if r["system"].startswith(system)]
        ax.plot(*zip(*points, strict=True), style, label=system)
    if rows[0]["system"].startswith("naive"):
        ax.axhline(rows[0]["x_real_time"], color="gray", linestyle=":", label="naive (one at a time)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests at once")
    ax.set_ylabel("x real-time")
    ax.set_title(f"Offline throughput, {meta['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "offline.png", dpi=120)
    print(f"wrote {out / 'offline.json'} and {out / 'offline.png'}")

"""`streamvox bench gpu`: what one GPU does with the engine, in phases that each fit a time budget.

1. environment: device, torch, CUDA, triton.
2. correctness, on the tiny checkpoints: device fp32 against CPU fp32 (last-position logits after a prompt,
   greedy tokens, PCM), and the bf16 drift (logits, greedy tokens agreeing before the first difference).
3. LM decode sweep, Orpheus: one step of B rows at context C (KV filled with noise, nothing prefilled), timed
   with sampling and the copy back: ms per step, tokens/s, and the real-time streams those tokens could feed.
4. codec cost: one chunk of one frame per request, B requests a call, for SNAC, Mimi and the 12 Hz decoder:
   seconds of compute per second of audio, and the streams the codec alone could keep real-time.
5. Poisson load against the in-process engine (streaming policy): arrivals at several rates, each request a
   fixed length of audio (stop token ignored); TTFA p50/p90/p99 from the arrival, the share of viable streams
   (no stall, DESIGN.md section 8, no client prebuffer), peak concurrent streams, and goodput: the highest rate
   with p90 TTFA within the SLO and at least 99 % viable. Orpheus first, then CSM and Qwen3-TTS.

Every phase checks the time left, catches its own failure, prints it and lets the next one run. The models are
the full-size random-weight ones (`make-tiny --size full`, weights drawn on the device) or, with `--size tiny`,
the tiny checkpoints (a CPU smoke test of the whole benchmark).
"""

from __future__ import annotations

import gc
import json
import math
import platform
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamvox.batch import NewRequest, ScheduledRow, StepBatch
from streamvox.bench.metrics import StreamTimeline, percentile, stalls
from streamvox.bench.serve import PROMPTS, VIABLE_SHARE
from streamvox.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from streamvox.engine.core import EngineCore, QueueFullError
from streamvox.engine.local import Engine
from streamvox.layers.attention import resolve_backend
from streamvox.models.base import ChunkJob, SpeechModel
from streamvox.models.full_size import write_full
from streamvox.runner.codec_runner import CodecRunner, PendingChunk
from streamvox.runner.device import describe, resolve_device, resolve_dtype
from streamvox.runner.lm_runner import LMRunner
from streamvox.runner.weights import cache_dir, load_model

FAMILIES = ("orpheus", "csm", "qwen3-tts")  # full-size configs exist for these
TINY_ONLY = ("cosyvoice2", "chatterbox")  # checked and loaded at their tiny size whatever `size` is
SLO_S = 0.5


@dataclass(frozen=True)
class Plan:
    """How big each phase is: the full plan fits about 7 minutes on one H100/H200, the tiny one a minute."""

    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    timed_steps: int
    codec_batches: tuple[int, ...]
    load_window_s: float  # arrivals are drawn over this long at each rate
    audio_s: float  # of every request in the load
    load_fractions: tuple[float, ...]  # rates, as shares of the rate the decode sweep says the device can feed
    max_num_seqs: int
    max_codec_frames: int
    correctness_frames: int
    overlap_rows: int  # LM rows a step in the codec-overlap phase
    drain_s: float  # a rate's run may go on this long past its arrivals and twice the audio, to finish streams


FULL = Plan((1, 8, 32, 64, 128, 256), (128, 1024), 8, (1, 8, 32, 128), 10.0, 4.0, (0.25, 0.5, 1.0, 1.5, 2.0),
            256, 64, 12, 64, 15.0)
TINY = Plan((1, 8), (128,), 3, (1, 8), 3.0, 1.0, (0.25, 0.5), 16, 8, 4, 8, 3.0)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    @property
    def left_s(self) -> float:
        return self.deadline - time.monotonic()


def run_gpu(out_dir: str, device: str = "auto", dtype: str = "auto", size: str = "full",
            time_budget_s: float = 400.0) -> dict:
    budget = Budget(time_budget_s)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    plan = FULL if size == "full" else TINY
    report: dict = {"env": _environment(torch_device, torch_dtype, size), "correctness": [], "decode": [],
                    "codec": [], "load": {}, "skipped": [], "errors": []}
    _print_env(report["env"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def phase(name: str, needs_s: float, run: Callable[[], None]) -> None:
        if budget.left_s < needs_s:
            print(f"[{name}] skipped: {budget.left_s:.0f} s left, it needs about {needs_s:.0f} s", flush=True)
            report["skipped"].append(name)
            return
        started = time.monotonic()
        print(f"[{name}] ...", flush=True)
        try:
            run()
        except Exception as error:  # noqa: BLE001 - one phase failing must not stop the others
            traceback.print_exc()
            report["errors"].append({"phase": name, "error": f"{type(error).__name__}: {error}"})
            print(f"[{name}] FAILED: {type(error).__name__}: {error}", flush=True)
        finally:
            gc.collect()
            if torch_device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[{name}] {time.monotonic() - started:.1f} s", flush=True)
        (out / "gpu.json").write_text(json.dumps(report, indent=2))  # what is done so far survives a kill

    scale = 1.0 if size == "full" else 0.1
    phase("correctness", 30 * scale, lambda: report["correctness"].extend(_correctness(torch_device, plan)))
    models: dict[str, SpeechModel] = {}

    def orpheus() -> SpeechModel:
        if "orpheus" not in models:
            models["orpheus"] = _load(FAMILIES[0], size, torch_device, torch_dtype)
        return models["orpheus"]

    phase("decode sweep", 60 * scale, lambda: report["decode"].extend(_decode_sweep(orpheus(), plan, budget, report)))
    phase("step profile", 20 * scale, lambda: report.update(profile=_step_profile(orpheus())))
    phase("codec overlap", 20 * scale, lambda: report.update(overlap=_codec_overlap(orpheus(), plan)))
    phase("codec cost", 40 * scale,
          lambda: report["codec"].extend(_codec_costs(orpheus(), size, torch_device, torch_dtype, plan)))
    for family in FAMILIES + TINY_ONLY:
        def load_phase(family: str = family) -> None:
            family_size = "tiny" if family in TINY_ONLY else size
            model = orpheus() if family == "orpheus" else _load(family, family_size, torch_device, torch_dtype)
            report["load"][family] = _poisson(model, TINY if family_size == "tiny" else plan, budget,
                                              report["decode"])

        phase(f"load {family}", (100 if family == "orpheus" else 70 if family in FAMILIES else 10) * scale,
              load_phase)
        models.clear()
    (out / "gpu.json").write_text(json.dumps(report, indent=2))
    _plot(report, out)
    print(format_report(report), flush=True)
    print(f"wrote {out / 'gpu.json'}", flush=True)
    return report


# -- environment -----------------------------------------------------------------------------------------------

def _environment(device: torch.device, dtype: torch.dtype, size: str) -> dict:
    env = {"device": describe(device), "device_type": device.type, "dtype": str(dtype).replace("torch.", ""),
           "size": size, "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def _print_env(env: dict) -> None:
    print("bench gpu: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)


def _load(family: str, size: str, device: torch.device, dtype: torch.dtype) -> SpeechModel:
    if size == "tiny":
        return load_model(f"tiny-{family}", dtype=str(dtype).replace("torch.", ""), device=str(device))
    path = write_full(family, cache_dir() / f"full-{family}")
    started = time.perf_counter()
    model = load_model(str(path), dtype=str(dtype).replace("torch.", ""), device=str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"  full-size {family} drawn on {device} in {time.perf_counter() - started:.1f} s", flush=True)
    return model


# -- correctness -------------------------------------------------------------------------------------------------

def _correctness(device: torch.device, plan: Plan) -> list[dict]:
    rows = []
    for family in FAMILIES + TINY_ONLY:
        try:
            rows.append(_check_family(family, device, plan))
        except Exception as error:  # noqa: BLE001 - one family failing must not hide the others' rows
            traceback.print_exc()
            rows.append({"family": family, "error": f"{type(error).__name__}: {error}"})
        print(f"  {family}: {rows[-1]}", flush=True)
    return rows


def _check_family(family: str, device: torch.device, plan: Plan) -> dict:
    """One family's row of the correctness phase: device fp32 and bf16 against the CPU."""
    reference = load_model(f"tiny-{family}", dtype="float32", device="cpu")
    same = load_model(f"tiny-{family}", dtype="float32", device=str(device))
    low = load_model(f"tiny-{family}", dtype="bfloat16", device=str(device))
    steps = plan.correctness_frames * reference.timing.lm_steps_per_frame
    ref_logits, ref_tokens, ref_pcm = _run(reference, steps)
    row = {"family": family}
    for name, model in (("fp32", same), ("bf16", low)):
        logits, tokens, pcm = _run(model, steps)
        drawable = ref_logits.isfinite()  # ids a family never draws are -inf in both
        if not torch.equal(drawable, logits.isfinite()):
            raise AssertionError(f"{family} {name}: other ids are drawable than on the CPU")
        diff = (logits[drawable] - ref_logits[drawable]).norm() / ref_logits[drawable].norm()
        agree = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), len(tokens))
        row[f"{name}_logits_rel"] = float(diff)
        row[f"{name}_greedy_agree"] = f"{agree}/{len(tokens)}"
        if name == "fp32":
            row["fp32_greedy_equal"] = agree == len(tokens)
            row["fp32_pcm_max_abs"] = float(np.abs(pcm - ref_pcm).max()) if len(pcm) == len(ref_pcm) else None
    return row


def _run(model: SpeechModel, steps: int) -> tuple[torch.Tensor, list, np.ndarray]:
    """Last-position logits after a prompt (fp32, on the CPU), then a greedy run of `steps` steps: its step
    outputs and PCM."""
    engine = Engine(model, EngineConfig(cache=CacheConfig(num_blocks=256),
                                        scheduler=SchedulerConfig(policy="fcfs")))
    try:
        text = "Checking the device against the CPU, step by step."
        prepared = model.prepare_request(text, None)
        prompt = prepared.prompt
        runner = engine.lm_runner
        runner.capture_graphs()  # CUDA: the greedy run below replays them
        sampling = SamplingParams(temperature=0.0, seed=0)
        runner.execute(StepBatch((NewRequest("check", tuple(prompt), sampling, 0, tuple(prepared.text_ids), True,
                                             prepared.prompt_embeds, prepared.guidance),), (), ()))
        blocks = tuple(range(-(-len(prompt) // 16) * prepared.num_lanes))
        logits = runner.logits(ScheduledRow("check", 0, len(prompt), blocks, True))[-1].float().cpu()
        runner.execute(StepBatch((), (), ("check",)))
        greedy = SamplingParams(temperature=0.0, seed=0, max_tokens=steps, ignore_eos=True)
        result = engine.result(engine.submit(text, None, greedy))
        return logits, list(result.step_tokens), result.pcm
    finally:
        engine.close()


# -- decode sweep ------------------------------------------------------------------------------------------------

DECODE_VARIANTS = (("gather", "gather", False), ("kernel", "triton", False), ("graphs", "triton", True))


def _decode_sweep(model: SpeechModel, plan: Plan, budget: Budget, report: dict) -> list[dict]:
    """ms per decode step at each (batch, context), sampling with the family's defaults included, for each way
    of running it: `gather` (contexts copied out of the cache, eager), `kernel` (the Triton kernel reading the
    cache in place, eager) and `graphs` (the kernel, replayed as CUDA graphs; on a CPU the graphs' static
    buffers run eagerly). Tokens/s and real-time streams are the fastest way's."""
    block_size = 16
    steps = plan.timed_steps + 2
    blocks_per_row = -(-(max(plan.contexts) + steps + 1) // block_size)
    points = {(context, batch): {"batch": batch, "context": context} for context in plan.contexts
              for batch in plan.batches}
    tokens_per_audio_s = model.timing.frame_rate_hz * model.timing.lm_steps_per_frame
    for name, attention, graphs in DECODE_VARIANTS:
        runner = LMRunner(model, max(plan.batches) * blocks_per_row, block_size, model.dtype, attention=attention,
                          graph_rows=max(plan.batches) if graphs else 0, max_context=blocks_per_row * block_size)
        runner.kv_cache.normal_()  # timings on data, not zeros
        if graphs and (capture := runner.capture_graphs()) is not None:
            report["graphs"] = {"buckets": list(capture.buckets), "capture_s": round(capture.seconds, 2),
                                "memory_mib": round(capture.bytes / 2**20, 1)}
            print(f"  graphs: {report['graphs']}", flush=True)
        try:
            for (context, batch), row in points.items():
                if budget.left_s < 20:
                    print(f"  (decode sweep cut short by the time budget at {name})", flush=True)
                    break
                row[f"{name}_ms"] = _decode_point(runner, model, batch, context, steps, blocks_per_row,
                                                  model.ids.audio_offset)
                print(f"  {name}: {row}", flush=True)
        finally:
            del runner
    rows = []
    for row in points.values():
        times = [row[f"{name}_ms"] for name, *_ in DECODE_VARIANTS if f"{name}_ms" in row]
        if times:
            tokens_per_s = row["batch"] / min(times) * 1000
            row.update(tokens_per_s=round(tokens_per_s, 1),
                       realtime_streams=round(tokens_per_s / tokens_per_audio_s, 1))
            if "graphs_ms" in row:
                row["graphs_vs_gather"] = round(row["gather_ms"] / row["graphs_ms"], 2)
            rows.append(row)
    return rows


def _decode_point(runner: LMRunner, model: SpeechModel, batch_size: int, context: int, steps: int,
                  blocks_per_row: int, audio_token, sampling: SamplingParams | None = None, profiler=None) -> float:
    """Median ms of a decode step of `batch_size` rows at `context`; `profiler` (a torch.profiler.profile, not
    yet started) records the last step."""
    sampling = (sampling or model.default_sampling).replace(ignore_eos=True, max_tokens=10**6)
    ids = [f"d{batch_size}-{context}-{i}" for i in range(batch_size)]
    tables = [tuple(range(i * blocks_per_row, (i + 1) * blocks_per_row)) for i in range(batch_size)]
    prompt = (audio_token,) * (context + 1)
    news = tuple(NewRequest(rid, prompt, sampling.replace(seed=i), 0) for i, rid in enumerate(ids))
    times = []
    for step in range(steps):
        rows = tuple(ScheduledRow(rid, context + step, 1, table, True) for rid, table in zip(ids, tables, strict=True))
        if profiler is not None and step == steps - 1:
            profiler.start()
        started = time.perf_counter()
        runner.execute(StepBatch(news if step == 0 else (), rows, ()))  # ends with the copy back: synchronised
        times.append(time.perf_counter() - started)
    if profiler is not None:
        profiler.stop()
    runner.execute(StepBatch((), (), tuple(ids)))
    return round(float(np.median(times[2:])) * 1000, 2)


# -- where a step's time goes -------------------------------------------------------------------------------------

def _step_profile(model: SpeechModel, batch_size: int = 64, context: int = 128) -> dict:
    """One Orpheus decode step of `batch_size` rows under torch.profiler, greedy and with the family's default
    sampling: wall time, kernels launched, and the ops that take the most host and device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    dtype = model.dtype
    blocks_per_row = -(-(context + 8) // 16)
    runner = LMRunner(model, batch_size * blocks_per_row, 16, dtype,
                      attention=resolve_backend("auto", model.device))  # eager: every op shows
    runner.kv_cache.normal_()
    result = {}
    for name, sampling in (("greedy", SamplingParams(temperature=0.0, seed=0)), ("default", None)):
        profiler = profile(activities=activities)
        ms_per_step = _decode_point(runner, model, batch_size, context, 6, blocks_per_row, model.ids.audio_offset,
                                    sampling, profiler)
        events = profiler.key_averages()
        device_key = next(key for key in ("self_device_time_total", "self_cuda_time_total")
                          if hasattr(events[0], key))
        result[name] = {"batch": batch_size, "context": context, "ms_per_step": ms_per_step,
                        "host_ops": sum(e.count for e in events if e.key.startswith("aten::")),
                        "by_host_time": _top_ops(events, "self_cpu_time_total"),
                        "by_device_time": _top_ops(events, device_key) if model.device.type == "cuda" else []}
        print(f"  {name}: {ms_per_step} ms per step; most host time: {result[name]['by_host_time'][:4]}; "
              f"most device time: {result[name]['by_device_time'][:4]}", flush=True)
    del runner
    return result


def _top_ops(events, key: str, count: int = 8) -> list[dict]:
    ranked = sorted(events, key=lambda e: -getattr(e, key, 0.0))[:count]
    return [{"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key, 0.0) / 1000, 3)} for e in ranked]


# -- codec cost --------------------------------------------------------------------------------------------------

def _codec_costs(orpheus: SpeechModel, size: str, device: torch.device, dtype: torch.dtype,
                 plan: Plan) -> list[dict]:
    rows = []
    for name, family in (("snac (orpheus)", "orpheus"), ("mimi (csm)", "csm"), ("12 Hz (qwen3-tts)", "qwen3-tts")):
        model = orpheus if family == "orpheus" else _load(family, size, device, dtype)
        for batch_size in plan.codec_batches:
            rows.append(_codec_point(name, model, batch_size))
            print(f"  {rows[-1]}", flush=True)
        del model
    return rows


def _codec_point(name: str, model: SpeechModel, batch_size: int, calls: int = 4) -> dict:
    """Each of `batch_size` requests decodes one frame a call, `calls` calls in a row (its state carried on)."""
    generator = torch.Generator().manual_seed(batch_size)
    frames = [torch.randint(0, 64, (calls + 3, model.codes_per_frame), generator=generator)
              for _ in range(batch_size)]
    states = [model.new_codec_state(None, seed) for seed in range(batch_size)]
    times = []
    with torch.inference_mode():
        for call in range(calls + 1):
            jobs = [ChunkJob(f, call, call + 1, False, i, states[i]) for i, f in enumerate(frames)]
            started = time.perf_counter()
            pcm = model.decode_chunks(jobs)
            torch.cat(pcm).cpu()  # synchronised, as the engine's one copy per batch
            times.append(time.perf_counter() - started)
    for state in states:
        model.release_codec_state(state)
    call_s = float(np.median(times[1:]))
    audio_s = batch_size * model.timing.samples_per_frame / model.timing.sample_rate
    return {"codec": name, "batch": batch_size, "ms_per_call": round(call_s * 1000, 2),
            "s_per_audio_s": round(call_s / audio_s, 5), "realtime_streams": round(audio_s / call_s, 1)}


# -- codec beside the LM ----------------------------------------------------------------------------------------

def _codec_overlap(model: SpeechModel, plan: Plan) -> dict:
    """How much of the codec's time hides behind LM steps when both run at once, as in the engine: decode steps
    of `overlap_rows` rows (the fastest way: graphs on CUDA) on this thread, while the codec runner decodes
    batches of one frame per request back to back on its own thread (and, on CUDA, its own stream).

    hidden share = 1 - (LM step time with the codec beside - alone) / (codec time those steps would have waited
    for had the two run one after the other): 1 when the codec costs the LM nothing, 0 when they serialise."""
    rows, context, block_size = plan.overlap_rows, min(plan.contexts), 16
    blocks_per_row = -(-(context + plan.timed_steps * 4 + 8) // block_size)
    attention = resolve_backend("auto", model.device)
    runner = LMRunner(model, rows * blocks_per_row, block_size, model.dtype, attention=attention,
                      graph_rows=rows if attention == "triton" else 0, max_context=blocks_per_row * block_size)
    runner.kv_cache.normal_()
    runner.capture_graphs()
    codec = CodecRunner(model)
    frames = torch.randint(0, 64, (4, model.codes_per_frame), generator=torch.Generator().manual_seed(0))
    pending = [PendingChunk(f"c{i}", 1, 2, False, ChunkJob(frames, 1, 2, False, i, None))
               for i in range(plan.max_codec_frames)]  # stateless calls: each decodes the same frame afresh

    def codec_calls(stop: threading.Event, times: list[float], calls: int = 0) -> None:
        """Calls back to back until `stop` (at least `calls`, and one)."""
        with torch.inference_mode():
            while not stop.is_set() or len(times) < max(1, calls):
                started = time.perf_counter()
                codec.decode(pending)
                times.append(time.perf_counter() - started)

    def lm_ms(steps: int) -> float:
        return _decode_point(runner, model, rows, context, steps, blocks_per_row, model.ids.audio_offset)

    alone_times: list[float] = []
    stop = threading.Event()
    stop.set()
    codec_calls(stop, alone_times, calls=5)
    lm_alone = lm_ms(plan.timed_steps + 2)
    beside_times: list[float] = []
    stop = threading.Event()
    thread = threading.Thread(target=codec_calls, args=(stop, beside_times))
    thread.start()
    try:
        lm_beside = lm_ms(plan.timed_steps * 3 + 2)
    finally:
        stop.set()
        thread.join()
    codec_alone, codec_beside = float(np.median(alone_times[1:])) * 1000, float(np.median(beside_times)) * 1000
    waited = lm_beside / codec_beside * codec_alone  # per LM step, had the codec calls run in between
    result = {"lm_rows": rows, "context": context, "codec_requests": len(pending), "lm_ms": lm_alone,
              "lm_ms_codec_beside": lm_beside, "codec_ms": round(codec_alone, 2),
              "codec_ms_lm_beside": round(codec_beside, 2),
              "hidden_share": round(1 - (lm_beside - lm_alone) / waited, 3)}
    print(f"  {result}", flush=True)
    return result


# -- Poisson load ------------------------------------------------------------------------------------------------

def _poisson(model: SpeechModel, plan: Plan, budget: Budget, decode_rows: list[dict]) -> list[dict]:
    config = EngineConfig(scheduler=SchedulerConfig(policy="streaming", max_num_seqs=plan.max_num_seqs,
                                                    max_num_batched_tokens=2048, max_queue_len=plan.max_num_seqs,
                                                    max_codec_frames=plan.max_codec_frames))
    started = time.perf_counter()
    engine = EngineCore(model, config)
    engine.warm_up()
    print(f"  engine up in {time.perf_counter() - started:.1f} s: {engine.pool.num_blocks} KV blocks", flush=True)
    streams = _capacity_streams(model, decode_rows, plan)
    base_rate = streams / (plan.audio_s + 1.0)  # each stream is busy for its audio plus its start
    rows, misses = [], 0
    try:
        for fraction in plan.load_fractions:
            rate = round(base_rate * fraction, 3)
            if budget.left_s < plan.load_window_s + 2 * plan.audio_s + plan.drain_s or misses >= 2:
                break
            rows.append(_load_at(engine, model, rate, plan, seed=len(rows)))
            print(f"  {rows[-1]}", flush=True)
            misses = 0 if rows[-1]["meets_slo"] else misses + 1
    finally:
        engine.close()
    good = [row["rate"] for row in rows if row["meets_slo"]]
    for row in rows:
        row["goodput"] = max(good) if good else 0.0
    return rows


def _capacity_streams(model: SpeechModel, decode_rows: list[dict], plan: Plan) -> float:
    """Streams the device can feed, from the decode sweep (Orpheus) or a guess scaled from it (other families,
    which take one backbone step per frame and run a depth loop)."""
    best = max((row["realtime_streams"] for row in decode_rows if row["context"] == min(plan.contexts)),
               default=plan.max_num_seqs / 4)
    return min(best, plan.max_num_seqs) * (1.0 if model.family == "orpheus" else 0.5)


def _load_at(engine: EngineCore, model: SpeechModel, rate: float, plan: Plan, seed: int) -> dict:
    rng = random.Random(f"gpu/{rate}/{seed}")
    arrivals, clock = [], 0.0
    while True:
        clock += rng.expovariate(rate)
        if clock > plan.load_window_s:
            break
        arrivals.append(clock)
    arrivals = arrivals or [0.0]
    steps = round(plan.audio_s * model.timing.frame_rate_hz) * model.timing.lm_steps_per_frame
    start = time.monotonic()
    sent: dict[str, float] = {}
    chunks: dict[str, list[tuple[float, float]]] = {}
    refused, failed, active, peak = 0, 0, set(), 0
    sample_rate = model.timing.sample_rate
    next_arrival = 0
    deadline = start + plan.load_window_s + 2 * plan.audio_s + plan.drain_s
    while time.monotonic() < deadline:
        now = time.monotonic() - start
        while next_arrival < len(arrivals) and arrivals[next_arrival] <= now:
            request_id = f"r{rate}-{next_arrival}"
            text = rng.choice(PROMPTS)
            sampling = engine.check_request(text, None, model.default_sampling.replace(
                max_tokens=steps, ignore_eos=True, seed=next_arrival))
            prepared = model.prepare_request(text, None)
            try:
                engine.add_request(request_id, prepared, sampling, steps)
                sent[request_id], chunks[request_id] = arrivals[next_arrival], []
                active.add(request_id)
            except QueueFullError:
                refused += 1
            next_arrival += 1
        peak = max(peak, len(active))
        if not engine.has_unfinished():
            if next_arrival >= len(arrivals):
                break
            time.sleep(max(0.0, min(0.05, arrivals[next_arrival] - (time.monotonic() - start))))
            continue
        events = engine.step()
        at = time.monotonic() - start
        for chunk in events.chunks:
            if chunk.request_id in chunks:
                chunks[chunk.request_id].append((at, len(chunk.pcm) / sample_rate))
                if chunk.is_last:
                    active.discard(chunk.request_id)
        for failure in events.failures:
            failed += 1
            active.discard(failure.request_id)
            chunks.pop(failure.request_id, None)
    no_audio = sum(1 for rid in active if not chunks.get(rid))
    for request_id in list(active):  # out of time: these count as not viable
        engine.cancel(request_id)
    timelines = [StreamTimeline(tuple(at - sent[rid] for at, _ in pieces), tuple(d for _, d in pieces))
                 for rid, pieces in chunks.items()]
    ttfas = [t.ttfa_s for t in timelines] + [math.inf] * (refused + failed)
    viable = sum(1 for t, rid in zip(timelines, chunks, strict=True) if t.arrivals_s and stalls(t)[0] == 0
                 and rid not in active)
    total = len(arrivals)
    p90 = percentile(ttfas, 90)
    share = viable / total
    return {"rate": rate, "requests": total, "refused": refused, "failed": failed, "no_audio_by_end": no_audio,
            "ttfa_p50_s": round(percentile(ttfas, 50), 3), "ttfa_p90_s": round(p90, 3),
            "ttfa_p99_s": round(percentile(ttfas, 99), 3), "viable": round(share, 3), "peak_streams": peak,
            "meets_slo": bool(p90 <= SLO_S and share >= VIABLE_SHARE)}


# -- report --------------------------------------------------------------------------------------------------------

def format_report(report: dict) -> str:
    """The final tables, in Markdown."""
    env = report["env"]
    lines = [f"\n## bench gpu: {env['device']}, {env['dtype']}, {env['size']} models, torch {env['torch']}, "
             f"CUDA {env['cuda']}, triton {env['triton']}, Python {env['python']}", ""]
    lines += _table("Correctness (tiny checkpoints, against CPU fp32)", report["correctness"])
    lines += ["SNAC (orpheus) adds noise drawn from each request's seed by the device's generator, so its PCM is "
              "not the CPU's; Mimi and the 12 Hz decoder have none.", ""]
    lines += _table("LM decode step, Orpheus, ms (sampling and copy back included): contexts gathered, the Triton "
                    "kernel, the kernel in CUDA graphs", report["decode"])
    for name, profiled in report.get("profile", {}).items():
        lines += _table(f"One decode step, {name} sampling, batch {profiled['batch']}: {profiled['ms_per_step']} ms, "
                        f"{profiled['host_ops']} aten calls; ops by host time", profiled["by_host_time"])
        if profiled["by_device_time"]:
            lines += _table("... and by device time", profiled["by_device_time"])
    if "graphs" in report:
        graphs = report["graphs"]
        lines += [f"CUDA graphs for batch sizes {graphs['buckets']}: captured in {graphs['capture_s']} s, "
                  f"{graphs['memory_mib']} MiB.", ""]
    if "overlap" in report:
        lines += _table("Codec beside the LM (hidden share: the part of codec time the LM step does not wait "
                        "for)", [report["overlap"]])
    lines += _table("Codec, one frame per request per call", report["codec"])
    for family, rows in report["load"].items():
        lines += _table(f"Poisson load, {family} (streaming policy, TTFA SLO {SLO_S} s; TTFA inf: no audio by the end "
                        "of the run)", rows)
    if report["skipped"]:
        lines.append(f"skipped for time: {', '.join(report['skipped'])}")
    for error in report["errors"]:
        lines.append(f"FAILED {error['phase']}: {error['error']}")
    return "\n".join(lines)


def _table(title: str, rows: list[dict]) -> list[str]:
    if not rows:
        return [f"### {title}: no results", ""]
    keys = list(dict.fromkeys(key for row in rows for key in row))  # every row's columns (a failed row has few)
    return [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            *("| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in rows), ""]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value else f"{value:g}"
    return str(value)


def _plot(report: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        print("no matplotlib: no plot", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for context in sorted({row["context"] for row in report["decode"]}):
        points = [(row["batch"], row["tokens_per_s"]) for row in report["decode"] if row["context"] == context]
        left.plot(*zip(*points, strict=True), "o-", label=f"context {context}")
    left.set_xscale("log", base=2)
    left.set_xlabel("rows per step")
    left.set_ylabel("tokens / s")
    left.set_title("Orpheus decode")
    left.legend()
    for family, rows in report["load"].items():
        if rows:
            right.plot([r["rate"] for r in rows], [r["ttfa_p90_s"] for r in rows], "o-", label=family)
    right.axhline(SLO_S, color="gray", linestyle=":")
    right.set_xlabel("arrivals / s")
    right.set_ylabel("TTFA p90 (s)")
    right.set_title("Poisson load")
    right.legend()
    fig.suptitle(f"{report['env']['device']}, {report['env']['dtype']}")
    fig.tight_layout()
    fig.savefig(out / "gpu.png", dpi=110)

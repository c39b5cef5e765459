"""Open-loop load generator: Gamma arrivals at a sweep of rates against servers speaking our API, goodput.

Requests are sent at times drawn from a Gamma process (shape = burstiness; 1.0 is Poisson, lower is
burstier) whatever the server does, so a slow server meets a growing queue, as it would in production. Each
request speaks a sentence from a built-in set of varied lengths, with `max_tokens` set from the text length
(about 14 characters per second of speech) and the stop token ignored, so every system makes the same audio.
The schedule depends only on the seed and the rate: every system gets the same requests at the same moments.

Per rate: TTFA p50/p90/p99, stalled chunks, viable requests (no stall, no error), underrun, audio seconds,
errors (DESIGN.md §8; TTFA is measured from the scheduled send time). Goodput is the highest rate run at
which p90 TTFA is within the SLO and at least 99 % of requests are viable.

Beside goodput stands the engine's offline capacity for the same request mix, in real-time streams: N requests of
the mix kept in flight at once on the in-process engine (offline policy, no server), for growing N; the capacity
is the N at which the audio made per wall second equals N (every stream exactly real time), interpolated between
the levels run. As arrivals: capacity / mean audio seconds per request. Goodput is reported as a share of it.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from streamvox.bench.local_server import LocalServer
from streamvox.bench.metrics import StreamTimeline, percentile, stalls

CHARS_PER_SECOND = 14.0
VIABLE_SHARE = 0.99
WAV_HEADER_BYTES = 44

PROMPTS = [
    "Good morning.",
    "Your table is ready.",
    "Turn left at the next corner.",
    "The package will arrive on Friday.",
    "Thanks for calling, how can I help you today?",
    "It looks like rain this afternoon, so bring an umbrella.",
    "The museum opens at nine and closes at five on weekdays.",
    "I found three flights to Lisbon next week; the cheapest leaves on Tuesday.",
    "Before you start, make sure the oven is hot and the tray is lightly greased.",
    "Your order of two notebooks and a box of pencils has been shipped and should arrive within four days.",
    "The quarterly report shows sales up eight percent, mostly from the new stores in the north of the country.",
    "Once upon a time, a fox lived at the edge of a quiet forest and watched the farmers walk to market.",
    "If the light on the router keeps blinking orange, unplug it for thirty seconds, then plug it back in and "
    "wait two minutes.",
    "Welcome aboard. Please keep your seat belt fastened while seated, and make sure your bags are stored under "
    "the seat in front of you.",
]

# how each named system is started when the load generator starts its own servers
SYSTEMS = {
    "streaming": ["--policy", "streaming"],
    "fcfs": ["--policy", "fcfs"],
    "offline": ["--policy", "offline"],
    "naive": ["--engine", "naive"],
}


@dataclass(frozen=True)
class LoadSpec:
    rates: tuple[float, ...]
    num_requests: int = 20  # per rate, at most
    min_requests: int = 10  # per rate, at least
    window_s: float = 300.0  # below num_requests / window_s req/s, fewer requests: rate x window, >= min_requests
    burstiness: float = 1.0
    seed: int = 0
    slo_s: float = 0.5
    prebuffer_s: float = 0.0
    api: str = "openai"  # or "generate" (VoxServe's multipart form)
    tokens_per_audio_s: float = 82.0  # Orpheus: 7 tokens per 2048-sample frame at 24 kHz
    max_failed_rates: int = 2  # stop sweeping a system after this many rates in a row miss the SLO
    timeout_s: float = 120.0

    def requests_at(self, rate: float) -> int:
        return min(self.num_requests, max(self.min_requests, round(rate * self.window_s)))


@dataclass(frozen=True)
class Planned:
    send_s: float
    text: str
    seed: int
    max_tokens: int


def schedule(spec: LoadSpec, rate: float) -> list[Planned]:
    """The requests for one rate: Gamma inter-arrival times with mean 1/rate, the same for every system."""
    rng = random.Random(f"{spec.seed}/{rate}")
    plan, clock = [], 0.0
    for index in range(spec.requests_at(rate)):
        text = rng.choice(PROMPTS)
        seconds = len(text) / CHARS_PER_SECOND
        plan.append(Planned(clock, text, spec.seed * 100_000 + index, max(7, round(seconds * spec.tokens_per_audio_s))))
        clock += rng.gammavariate(spec.burstiness, 1.0 / (rate * spec.burstiness))
    return plan


CAPACITY_LEVELS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def realtime_capacity(spec: LoadSpec, model: str, device: str = "auto", dtype: str = "auto") -> dict:
    """The offline capacity for the request mix of `spec`, in real-time streams and in requests per second."""
    from streamvox.config import CacheConfig, SchedulerConfig
    from streamvox.engine.local import Engine

    mix = schedule(LoadSpec((1.0,), 64, 64, seed=spec.seed, tokens_per_audio_s=spec.tokens_per_audio_s), 1.0)
    engine = Engine.from_pretrained(model, device=device, dtype=dtype, cache=CacheConfig(kv_cache_mb=1024),
                                    scheduler=SchedulerConfig(policy="offline", max_num_batched_tokens=2048))
    engine.warm_up()
    levels, audio_s, num_done, previous = [], 0.0, 0, (0, 0.0)
    for level in CAPACITY_LEVELS:
        requests = [mix[i % len(mix)] for i in range(3 * level + 3)]
        made_s, wall_s = _closed_loop(engine, requests, level)
        audio_s, num_done = audio_s + made_s, num_done + len(requests)
        levels.append({"streams": level, "x_realtime": made_s / wall_s})
        print(f"  capacity: {level} in flight -> {made_s / wall_s:.2f}x real time", file=sys.stderr, flush=True)
        if made_s / wall_s < level:
            break
        previous = (level, made_s / wall_s)
    engine.close()
    low, low_x = previous
    high, high_x = levels[-1]["streams"], levels[-1]["x_realtime"]
    if high_x >= high:
        streams = float(high)  # the largest level run kept up: at least this many
    elif low == 0:
        streams = high_x  # not even one stream keeps real time: the share of one that does
    else:
        streams = low + (high - low) * (low_x - low) / ((low_x - low) - (high_x - high))  # x(N) - N crosses 0
    mean_audio_s = audio_s / max(1, num_done)
    return {"streams": round(streams, 2), "rps": round(streams / mean_audio_s, 3),
            "mean_audio_s": round(mean_audio_s, 2), "levels": levels}


def _closed_loop(engine, requests: list[Planned], level: int) -> tuple[float, float]:
    """Audio seconds made and wall seconds taken with `level` requests in flight, a new one as each ends."""
    todo, in_flight, made = list(requests), set(), 0
    started = time.perf_counter()
    while todo or in_flight:
        while todo and len(in_flight) < level:
            planned = todo.pop(0)
            sampling = engine.model.default_sampling.replace(max_tokens=planned.max_tokens, ignore_eos=True,
                                                             seed=planned.seed)
            in_flight.add(engine.submit(planned.text, sampling=sampling))
        for chunk in engine.step().chunks:
            made += len(chunk.pcm)
            if chunk.is_last:
                in_flight.discard(chunk.request_id)
                engine.cancel(chunk.request_id)  # its output is not needed
    return made / engine.model.timing.sample_rate, time.perf_counter() - started


def run_serve(spec: LoadSpec, out_dir: str, targets: dict[str, str] | None = None,
              systems: dict[str, float] | None = None, model: str = "tiny-orpheus",
              extra_flags: list[str] | None = None, capacity: dict | None = None) -> dict:
    """Sweep every target (name -> URL) and every named system (name -> lowest rate to run; a local server
    each, one at a time). `capacity`: the mix's offline capacity (`realtime_capacity`), to report goodput
    against."""
    results = {}
    for name, url in (targets or {}).items():
        results[name] = _sweep(name, url, spec)
    for name, min_rate in (systems or {}).items():
        with LocalServer(model, [*SYSTEMS[name], *(extra_flags or [])]) as url:
            results[name] = _sweep(name, url, spec, min_rate)
    for result in results.values():
        if capacity:
            result["goodput_share"] = round(result["goodput_rps"] / capacity["rps"], 3)
    report = {"meta": {"model": model, **{k: v for k, v in spec.__dict__.items()}}, "systems": results,
              "capacity": capacity}
    _report(report, Path(out_dir))
    return report


def _sweep(name: str, url: str, spec: LoadSpec, min_rate: float = 0.0) -> dict:
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    sample_rate, model_id = models["sample_rate"], models["id"]
    rows, failed_in_a_row = [], 0
    for rate in [rate for rate in spec.rates if rate >= min_rate]:
        timelines, errors = asyncio.run(_one_rate(name, url, spec, rate, model_id, sample_rate))
        rows.append(summarise(rate, timelines, errors, spec))
        _print_row(name, rows[-1])
        failed_in_a_row = 0 if rows[-1]["meets_slo"] else failed_in_a_row + 1
        if failed_in_a_row >= spec.max_failed_rates:
            break
    return {"url": url, "rows": rows, "goodput_rps": goodput(rows)}


def goodput(rows: list[dict]) -> float:
    """The highest rate run that meets the SLO (DESIGN.md §8), 0 if none does."""
    return max((row["rate_rps"] for row in rows if row["meets_slo"]), default=0.0)


def summarise(rate: float, timelines: list[StreamTimeline | None], errors: list[str], spec: LoadSpec) -> dict:
    """One rate's figures; a None timeline is a failed request (never viable, TTFA infinite)."""
    done = [t for t in timelines if t is not None and t.arrivals_s]
    counts = [stalls(t, spec.prebuffer_s) for t in done]
    ttfas = [t.ttfa_s for t in done] + [math.inf] * (len(timelines) - len(done))
    viable = sum(c == 0 for c, _ in counts)
    num_requests = len(timelines)
    p90 = percentile(ttfas, 90)
    row = {
        "rate_rps": rate, "requests": num_requests, "errors": num_requests - len(done),
        "ttfa_p50_s": percentile(ttfas, 50), "ttfa_p90_s": p90, "ttfa_p99_s": percentile(ttfas, 99),
        "viable_share": viable / num_requests if num_requests else 0.0,
        "chunk_stall_rate": sum(c for c, _ in counts) / max(1, sum(len(t.arrivals_s) - 1 for t in done)),
        "underrun_s_mean": sum(u for _, u in counts) / max(1, len(done)),
        "underrun_s_max": max((u for _, u in counts), default=0.0),
        "audio_s": sum(sum(t.durations_s) for t in done),
        "error_samples": sorted(set(errors))[:3],
    }
    row["meets_slo"] = p90 <= spec.slo_s and row["viable_share"] >= VIABLE_SHARE
    return row


async def _one_rate(name: str, url: str, spec: LoadSpec, rate: float, model_id: str,
                    sample_rate: int) -> tuple[list[StreamTimeline | None], list[str]]:
    plan = schedule(spec, rate)
    errors: list[str] = []
    done = 0

    def progress() -> None:
        print(f"\r  {name} @ {rate:g} req/s: {done}/{len(plan)} done, {len(errors)} errors ", end="",
              file=sys.stderr, flush=True)

    limits = httpx.Limits(max_connections=len(plan) + 4, max_keepalive_connections=len(plan) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=spec.timeout_s, limits=limits) as client:
        start = time.perf_counter() + 0.1

        async def one(planned: Planned) -> StreamTimeline | None:
            nonlocal done
            await asyncio.sleep(max(0.0, start + planned.send_s - time.perf_counter()))
            try:
                return await _request(client, spec, planned, model_id, sample_rate, start + planned.send_s)
            except (httpx.HTTPError, _RequestError) as error:
                errors.append(f"{type(error).__name__}: {error}"[:200])
                return None
            finally:
                done += 1
                progress()

        progress()
        timelines = await asyncio.gather(*(one(planned) for planned in plan))
    print(file=sys.stderr)
    return list(timelines), errors


class _RequestError(Exception):
    pass


async def _request(client: httpx.AsyncClient, spec: LoadSpec, planned: Planned, model_id: str, sample_rate: int,
                   t0: float) -> StreamTimeline:
    fields = {"seed": planned.seed, "max_tokens": planned.max_tokens, "ignore_eos": True}
    if spec.api == "generate":
        form = {"text": planned.text, "streaming": "true", **{k: str(v).lower() for k, v in fields.items()}}
        request = client.build_request("POST", "/generate", data=form)
        skip = WAV_HEADER_BYTES
    else:
        body = {"model": model_id, "input": planned.text, "response_format": "pcm", **fields}
        request = client.build_request("POST", "/v1/audio/speech", json=body)
        skip = 0
    arrivals, durations = [], []
    response = await client.send(request, stream=True)
    try:
        if response.status_code != 200:
            await response.aread()
            raise _RequestError(f"HTTP {response.status_code}: {response.text[:120]}")
        async for data in response.aiter_raw():
            now = time.perf_counter()
            if skip:
                cut = min(skip, len(data))
                data, skip = data[cut:], skip - cut
            if data:
                arrivals.append(now - t0)
                durations.append(len(data) / 2 / sample_rate)
    finally:
        await response.aclose()
    if not arrivals:
        raise _RequestError("the response held no audio")
    return StreamTimeline(tuple(arrivals), tuple(durations))


def _print_row(name: str, row: dict) -> None:
    print(f"{name:>10} {row['rate_rps']:>6g} req/s  TTFA p50 {row['ttfa_p50_s']:.3f}s p90 {row['ttfa_p90_s']:.3f}s "
          f"p99 {row['ttfa_p99_s']:.3f}s  viable {row['viable_share']:.0%}  stalled chunks "
          f"{row['chunk_stall_rate']:.1%}  underrun max {row['underrun_s_max']:.2f}s  errors {row['errors']}"
          f"{'  meets SLO' if row['meets_slo'] else ''}", flush=True)


def _report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(report, indent=2, default=str))
    meta, systems = report["meta"], report["systems"]
    print(f"\nSLO: p90 TTFA <= {meta['slo_s']} s and >= {VIABLE_SHARE:.0%} viable; client prebuffer "
          f"{meta['prebuffer_s']} s; {meta['min_requests']}-{meta['num_requests']} requests per rate, burstiness "
          f"{meta['burstiness']}")
    print("\n| system | rate (req/s) | TTFA p50 (s) | TTFA p90 (s) | TTFA p99 (s) | viable | chunks stalled | "
          "max underrun (s) | errors | audio (s) |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, result in systems.items():
        for r in result["rows"]:
            print(f"| {name} | {r['rate_rps']:g} | {r['ttfa_p50_s']:.3f} | {r['ttfa_p90_s']:.3f} | "
                  f"{r['ttfa_p99_s']:.3f} | {r['viable_share']:.0%} | {r['chunk_stall_rate']:.1%} | "
                  f"{r['underrun_s_max']:.2f} | {r['errors']} | {r['audio_s']:.1f} |")
    capacity = report.get("capacity")
    if capacity:
        print(f"\noffline capacity for this mix: {capacity['streams']:g} real-time streams = {capacity['rps']:g} "
              f"req/s (mean {capacity['mean_audio_s']:g} s of audio a request)")
    print("\n| system | goodput (req/s) | share of capacity |\n|---|---|---|")
    for name, result in systems.items():
        share = f"{result['goodput_share']:.0%}" if "goodput_share" in result else "-"
        print(f"| {name} | {result['goodput_rps']:g} | {share} |")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in systems.items():
        rates = [r["rate_rps"] for r in result["rows"]]
        left.plot(rates, [min(r["ttfa_p90_s"], 60.0) for r in result["rows"]], marker="o", label=name)
        right.plot(rates, [100 * r["viable_share"] for r in result["rows"]], marker="o", label=name)
    left.axhline(meta["slo_s"], color="gray", linestyle=":", label="SLO")
    right.axhline(100 * VIABLE_SHARE, color="gray", linestyle=":")
    left.set(xscale="log", yscale="log", xlabel="arrival rate (req/s)", ylabel="TTFA p90 (s)",
             title="time to first audio")
    right.set(xscale="log", xlabel="arrival rate (req/s)", ylabel="viable requests (%)",
              title="streams without a stall")
    left.legend()
    fig.tight_layout()
    fig.savefig(out / "serve.png", dpi=120)
    print(f"wrote {out / 'serve.json'} and {out / 'serve.png'}")

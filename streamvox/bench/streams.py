"""Concurrent streams against a real server: TTFA and stalls at several concurrency levels, per policy.

For each policy a `streamvox serve` process is started on 127.0.0.1; at each level N, N clients each send
`rounds` requests back to back (so N streams are in flight at any time), every request producing the same
amount of audio (`max_tokens`, stop token ignored). A client records when each network read arrives and how much
audio it carried; metrics follow DESIGN.md §8 with no client prebuffer. A request the server refuses (429: it
cannot keep one more stream real-time) is counted apart, with the longest wait for such an answer; stalls and
TTFA are those of the streams admitted.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx

from streamvox.bench.local_server import LocalServer
from streamvox.bench.metrics import StreamTimeline, percentile, stalls

SENTENCES = [
    "The morning train was late again, so everyone waited on the cold platform.",
    "Please remember to water the plants on the balcony before you leave.",
    "A small boat drifted slowly across the lake as the sun went down.",
    "Our meeting has moved to Thursday afternoon at half past three.",
    "The library will stay open late during the exam weeks this winter.",
    "She painted the old fence bright blue and planted roses along it.",
]


def run_streams(model: str, policies: list[str], levels: list[int], rounds: int, max_tokens: int,
                out_dir: str, extra_flags: list[str] | None = None) -> list[dict]:
    rows = []
    for policy in policies:
        with LocalServer(model, ["--policy", policy, *(extra_flags or [])]) as url:
            sample_rate = httpx.get(f"{url}/v1/models").json()["data"][0]["sample_rate"]
            for level in levels:
                timelines = asyncio.run(_level(url, level, rounds, max_tokens, sample_rate))
                rows.append(_summarise(policy, level, timelines))
                _print_row(rows[-1])
    _report(rows, out_dir, {"model": model, "rounds": rounds, "max_tokens": max_tokens, "prebuffer_s": 0.0})
    return rows


async def _level(url: str, level: int, rounds: int, max_tokens: int,
                 sample_rate: int) -> list[StreamTimeline | float]:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=level + 4)) as client:
        async def one_client(index: int) -> list[StreamTimeline]:
            timelines = []
            for round_index in range(rounds):
                seed = index * 1000 + round_index
                body = {"model": "any", "input": SENTENCES[seed % len(SENTENCES)], "response_format": "pcm",
                        "seed": seed, "max_tokens": max_tokens, "ignore_eos": True}
                timelines.append(await _one_request(client, body, sample_rate))
            return timelines

        results = await asyncio.gather(*(one_client(i) for i in range(level)))
    return [timeline for timelines in results for timeline in timelines]


async def _one_request(client: httpx.AsyncClient, body: dict, sample_rate: int) -> StreamTimeline | float:
    """The request's timeline, or the seconds its 429 took if the server refused it as at capacity."""
    arrivals, durations = [], []
    body["model"] = (await client.get("/v1/models")).json()["data"][0]["id"]
    started = time.perf_counter()
    async with client.stream("POST", "/v1/audio/speech", json=body) as response:
        if response.status_code == 429:
            await response.aread()
            return time.perf_counter() - started
        response.raise_for_status()
        async for data in response.aiter_raw():
            arrivals.append(time.perf_counter() - started)
            durations.append(len(data) / 2 / sample_rate)
    return StreamTimeline(tuple(arrivals), tuple(durations))


def _summarise(policy: str, level: int, results: list[StreamTimeline | float]) -> dict:
    refusals_s = [r for r in results if isinstance(r, float)]
    timelines = [t for t in results if isinstance(t, StreamTimeline)] or [StreamTimeline((0.0,), (0.0,))]
    counts = [stalls(t) for t in timelines]
    num_pieces = sum(max(0, len(t.arrivals_s) - 1) for t in timelines)
    ttfas = [t.ttfa_s for t in timelines]
    audio_s = sum(sum(t.durations_s) for t in timelines)
    return {
        "policy": policy, "streams": level, "requests": len(results), "refused": len(refusals_s),
        "refusal_s_max": max(refusals_s, default=0.0),
        "ttfa_p50_s": percentile(ttfas, 50), "ttfa_p90_s": percentile(ttfas, 90), "ttfa_max_s": max(ttfas),
        "stall_rate": sum(c > 0 for c, _ in counts) / len(timelines),  # share of requests with any stall
        "chunk_stall_rate": sum(c for c, _ in counts) / max(1, num_pieces),
        "underrun_s_mean": sum(u for _, u in counts) / len(timelines),
        "audio_s": audio_s,
    }


def _print_row(row: dict) -> None:
    print(f"{row['policy']:>10} {row['streams']:>3} streams  TTFA p50 {row['ttfa_p50_s']:.3f}s "
          f"p90 {row['ttfa_p90_s']:.3f}s  stalled requests {row['stall_rate']:.0%}  "
          f"stalled chunks {row['chunk_stall_rate']:.1%}  mean underrun {row['underrun_s_mean']:.2f}s  "
          f"refused {row['refused']} (answered within {row['refusal_s_max']:.2f}s)", flush=True)


def table(rows: list[dict]) -> list[str]:
    """The rows as a Markdown table (benchmarks/report.py prints the same one)."""
    out = ["| policy | streams | admitted | refused (answered within, s) | TTFA p50 / p90 / max (s) | "
           "admitted with a stall | chunks stalled | mean underrun (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        admitted = r["requests"] - r["refused"]
        out.append(f"| {r['policy']} | {r['streams']} | {admitted} | {r['refused']} ({r['refusal_s_max']:.2f}) | "
                   f"{r['ttfa_p50_s']:.3f} / {r['ttfa_p90_s']:.3f} / {r['ttfa_max_s']:.3f} | {r['stall_rate']:.0%} | "
                   f"{r['chunk_stall_rate']:.1%} | {r['underrun_s_mean']:.2f} |")
    return out


def _report(rows: list[dict], out_dir: str, meta: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "streams.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n" + "\n".join(table(rows)))
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        levels = [r["streams"] for r in mine]
        left.plot(levels, [r["ttfa_p90_s"] for r in mine], marker="o", label=policy)
        right.plot(levels, [100 * r["stall_rate"] for r in mine], marker="o", label=policy)
    left.set(xlabel="concurrent streams", ylabel="TTFA p90 (s)", title="time to first audio")
    right.set(xlabel="concurrent streams", ylabel="requests with a stall (%)", title="stalls")
    left.legend()
    fig.tight_layout()
    fig.savefig(out / "streams.png", dpi=120)
    print(f"wrote {out / 'streams.json'} and {out / 'streams.png'}")

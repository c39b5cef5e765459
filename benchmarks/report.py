"""Writes benchmarks/README.md and the results block of README.md from the JSON that benchmarks/run.sh made.

Usage: python benchmarks/report.py benchmarks/results
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from datetime import date
from pathlib import Path

from streamvox.bench.serve import PROMPTS
from streamvox.bench.streams import table

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def main(results: Path) -> None:
    runs = [json.loads(path.read_text()) for path in sorted(results.glob("serve*/serve.json"))]
    # the page shows each system's first run in full, and the goodput of every run of it (the repeats)
    serve = {"meta": runs[0]["meta"], "systems": {}}
    for run in runs:
        for name, result in run["systems"].items():
            serve["systems"].setdefault(name, result)
    offline = json.loads((results / "offline" / "offline.json").read_text())
    streams_path = results / "streams" / "streams.json"
    streams = json.loads(streams_path.read_text()) if streams_path.exists() else None
    facts = _facts(serve, offline)
    facts["repeats"] = {name: [r["systems"][name]["goodput_rps"] for r in runs if name in r["systems"]]
                        for name in serve["systems"]}
    facts["capacity"] = [r["capacity"] for r in runs if r.get("capacity")]
    (ROOT / "benchmarks" / "README.md").write_text(_page(serve, offline, facts, streams))
    readme = (ROOT / "README.md").read_text()
    block = f"{BEGIN}\n{_summary(facts)}\n{END}"
    readme = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)
    (ROOT / "README.md").write_text(readme)
    print(_summary(facts))


def _facts(serve: dict, offline: dict) -> dict:
    systems = serve["systems"]
    goodput = {name: result["goodput_rps"] for name, result in systems.items()}
    # a system that met the SLO at no rate run: its goodput is below the lowest rate it was run at
    shown = {name: f"{good:g}" if good else f"< {min(r['rate_rps'] for r in systems[name]['rows']):g}"
             for name, good in goodput.items()}
    facts = {"goodput": goodput, "goodput_shown": shown, "slo_s": serve["meta"]["slo_s"],
             "serve_rows": {name: result["rows"] for name, result in systems.items()},
             "prebuffer_s": serve["meta"]["prebuffer_s"]}
    if "naive" in goodput and "streaming" in goodput:
        naive = goodput["naive"]
        facts["goodput_ratio"] = goodput["streaming"] / naive if naive else float("inf")
        # the baseline's best rate, or its lowest one if it met the SLO at none
        rate = naive or min(r["rate_rps"] for r in systems["naive"]["rows"])
        at = {name: _row_at(systems[name]["rows"], rate) for name in ("naive", "streaming")}
        if all(at.values()):
            facts["ttfa_p90_at"] = {"rate_rps": rate, **{name: row["ttfa_p90_s"] for name, row in at.items()}}
    if "fcfs" in systems and "streaming" in systems:
        below = [r for r in systems["fcfs"]["rows"] if r["viable_share"] < 0.9]
        if below:
            rate = below[0]["rate_rps"]
            streaming = _row_at(systems["streaming"]["rows"], rate)
            facts["fcfs_below_90"] = {"rate_rps": rate, "fcfs_viable": below[0]["viable_share"],
                                      "streaming_viable": streaming["viable_share"] if streaming else None}
    rows = offline["rows"]
    naive_x = rows[0]["x_real_time"]
    engine = [r for r in rows if r["system"] == "streamvox"]
    raw = [r for r in rows if r["system"].startswith("raw")]
    best = max(engine, key=lambda r: r["x_real_time"])
    facts["offline"] = {"naive_x": naive_x, "best_x": best["x_real_time"], "best_batch": best["batch_size"],
                        "ratio": best["x_real_time"] / naive_x,
                        "efficiency": {r["batch_size"]: r["engine_efficiency"] for r in raw}}
    return facts


def _row_at(rows: list[dict], rate: float) -> dict | None:
    return next((r for r in rows if abs(r["rate_rps"] - rate) < 1e-9), None)


def _summary(facts: dict) -> str:
    good, shown = facts["goodput"], facts["goodput_shown"]
    lines = [
        f"Figures from one run of `benchmarks/run.sh` on the tiny checkpoint, 2-core CPU "
        f"([details and plots](benchmarks/README.md)). SLO: p90 TTFA ≤ {facts['slo_s']} s and ≥ 99 % of "
        f"requests without a stall (client prebuffer {facts['prebuffer_s']} s).",
        "",
        "| measure | naive baseline | streamvox (`fcfs`) | streamvox (`streaming`) |",
        "|---|---|---|---|",
        f"| goodput (req/s) | {shown.get('naive', '–')} | {shown.get('fcfs', '–')} | {shown.get('streaming', '–')} |",
    ]
    if "ttfa_p90_at" in facts:
        at = facts["ttfa_p90_at"]
        lines.append(f"| TTFA p90 at {at['rate_rps']:g} req/s (s) | {at['naive']:.3f} | – | {at['streaming']:.3f} |")
    if "fcfs_below_90" in facts:
        f = facts["fcfs_below_90"]
        streaming = "–" if f["streaming_viable"] is None else f"{f['streaming_viable']:.0%}"
        lines.append(f"| viable at {f['rate_rps']} req/s | – | {f['fcfs_viable']:.0%} | {streaming} |")
    repeats = facts.get("repeats", {})
    if len(repeats.get("streaming", [])) > 1:
        runs = {name: " / ".join(f"{g:g}" for g in values) for name, values in repeats.items()}
        lines.append(f"| goodput in each repeat of the sweep (req/s) | {runs.get('naive', '–')} | "
                     f"{runs.get('fcfs', '–')} | {runs.get('streaming', '–')} |")
    capacities = [c for c in facts.get("capacity", []) if c]
    if capacities:
        pairs = zip(repeats.get("streaming", []), capacities, strict=False)
        shares = " / ".join(f"{g / c['rps']:.0%}" for g, c in pairs)
        lines.append(f"| offline capacity for the mix (real-time streams; req/s) | – | – | "
                     f"{' / '.join(str(c['streams']) for c in capacities)}; "
                     f"{' / '.join(str(c['rps']) for c in capacities)} (goodput: {shares} of it) |")
    o = facts["offline"]
    lines.append(f"| offline × real-time | {o['naive_x']} | – | {o['best_x']} (batch {o['best_batch']}) |")
    lines.append("")
    ratio = facts.get("goodput_ratio")
    if ratio is not None:
        lowest = min(r["rate_rps"] for r in facts["serve_rows"]["naive"]) if "serve_rows" in facts else None
        goodput = (f"the naive baseline meets the SLO at no rate run (goodput {shown['naive']} req/s), streaming's "
                   f"is {good['streaming']:g} req/s: more than {good['streaming'] / lowest:.0f}× the baseline's"
                   if ratio == float("inf")
                   else f"streaming is {ratio:.1f}× the naive baseline")
        lines.append(f"Goodput: {goodput}. Offline: {o['ratio']:.1f}× the baseline's × real-time; engine efficiency "
                     "(our throughput over the raw model's at the same batch size) "
                     + ", ".join(f"{e:.0%} at batch {b}" for b, e in o["efficiency"].items()) + ".")
    return "\n".join(lines)


def _streams_section(streams: dict | None) -> list[str]:
    if streams is None:
        return []
    meta = streams["meta"]
    out = ["## Concurrent streams (`streamvox bench streams`)", "",
           f"Closed loop: N clients each send {meta['rounds']} request(s) back to back ({meta['max_tokens']} tokens, "
           "the stop token ignored), so up to N streams are in flight at once; one server per policy. No client "
           "prebuffer. A request the server cannot keep real-time is refused (429) and counted apart.", "",
           *table(streams["rows"])]
    return out + ["", "![TTFA p90 and stalls against concurrent streams](results/streams/streams.png)", ""]


def _page(serve: dict, offline: dict, facts: dict, streams: dict | None) -> str:
    meta = serve["meta"]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    out = [
        "# Benchmarks",
        "",
        f"Regenerate everything here (and the results block of the top-level README) with `benchmarks/run.sh`; it "
        f"writes the JSON and plots under `benchmarks/results/`. Run on {date.today().isoformat()}: {cpu}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, no GPU; model "
        f"`{meta['model']}` (random weights: the timings are real, the audio is noise).",
        "",
        "GPU figures (`benchmarks/gpu.sh`, `streamvox bench gpu`) and how to reproduce them are in [GPU.md](GPU.md).",
        "",
        "## Systems",
        "",
        "- **naive**: `streamvox serve --engine naive`: one request at a time, `transformers` `generate()` for the "
        "LM and the `snac` package for each frame as soon as its window exists, streamed as decoded. Same "
        "checkpoint, sampling and HTTP API.",
        "- **streamvox `streaming`**: the engine with the deadline-aware policy (the default).",
        "- **streamvox `fcfs`**: the same engine with first-come-first-served admission, to show what the "
        "scheduler itself adds.",
        "",
        "## Streaming load (`streamvox bench serve`)",
        "",
        f"Open loop: Gamma arrivals (burstiness {meta['burstiness']}, 1 = Poisson), seed {meta['seed']}, "
        f"{meta['min_requests']}–{meta['num_requests']} requests per rate (rate × {meta['window_s']:g} s, within "
        "those bounds), every system given the same requests at the same moments. Texts come from a built-in set "
        f"of {min(map(len, PROMPTS))}–{max(map(len, PROMPTS))}-character sentences; `max_tokens` is set from the "
        "text (14 characters per second of speech, "
        f"{meta['tokens_per_audio_s']:g} tokens per second of audio) and the stop token ignored, so every system "
        "makes the same audio. A stall is a piece of audio arriving after everything before it has played "
        f"(client prebuffer {meta['prebuffer_s']} s); a request is viable with no stall and no error. Goodput: "
        f"the highest rate run with p90 TTFA ≤ {meta['slo_s']} s and ≥ 99 % viable (DESIGN.md §8). "
        f"A system stops after {meta['max_failed_rates']} rates in a row miss the SLO.",
        "",
        "```",
        "streamvox bench serve --systems naive,streaming,fcfs@0.2 --out benchmarks/results/serve",
        "```",
        "",
        "| system | rate (req/s) | requests | TTFA p50 (s) | TTFA p90 (s) | TTFA p99 (s) | viable | chunks stalled | "
        "max underrun (s) | errors | audio (s) | meets SLO |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in serve["systems"].items():
        for r in result["rows"]:
            out.append(f"| {name} | {r['rate_rps']:g} | {r['requests']} | {r['ttfa_p50_s']:.3f} | "
                       f"{r['ttfa_p90_s']:.3f} | {r['ttfa_p99_s']:.3f} | {r['viable_share']:.0%} | "
                       f"{r['chunk_stall_rate']:.1%} | {r['underrun_s_max']:.2f} | {r['errors']} | "
                       f"{r['audio_s']:.1f} | {'yes' if r['meets_slo'] else 'no'} |")
    out += ["", "![TTFA p90 and viability against the arrival rate](results/serve/serve.png)", "",
            "## Offline (`streamvox bench offline`)", "",
            "N requests at once with the `offline` policy, beside the naive pipeline (which runs them one after "
            "another) and the raw model: the LM forward + sampling and the codec called directly at the same batch "
            "size, with no scheduler, server or engine loop; its throughput is its slower stage's, as if the two "
            "stages overlapped perfectly on their own cores. LM s and codec s are busy time of each stage.", "",
            "```", f"streamvox bench offline --batch-sizes {','.join(map(str, offline['meta']['batch_sizes']))} "
            "--out benchmarks/results/offline", "```", "",
            "| system | batch | tokens | wall (s) | tokens/s | × real-time | LM s | codec s | vs naive | efficiency |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in offline["rows"]:
        out.append(f"| {r['system']} | {r['batch_size']} | {r['tokens']} | {r['wall_s']} | {r['tokens_per_s']} | "
                   f"{r['x_real_time']} | {r.get('lm_s', '')} | {r.get('codec_s', '')} | {r['x_naive']} | "
                   f"{'' if 'engine_efficiency' not in r else format(r['engine_efficiency'], '.0%')} |")
    out += ["", "![x real-time against batch size](results/offline/offline.png)", ""]
    out += _streams_section(streams)
    out += ["## Summary", "",
            _summary(facts).replace("benchmarks/README.md", "#benchmarks"), ""]
    return "\n".join(out)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "benchmarks" / "results"))

"""Offline throughput: the batched engine vs a plain sequential reference loop, on one checkpoint, in one run.

Baseline: `transformers.generate` (same sampling) for one request at a time, then the publisher's windowed
SNAC decode, one 4-frame window per call through the `snac` package. Engine: B requests submitted together.
Every request generates exactly `max_tokens` tokens (the stop token is ignored), so the work is identical.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from streamvox.codecs.snac import split_levels
from streamvox.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from streamvox.engine.core import Engine
from streamvox.models.orpheus import decode_windows
from streamvox.runner.weights import load_model, resolve_checkpoint

TEXT = "The quick brown fox jumps over the lazy dog while the radio plays a song."


def run_throughput(model_name: str, batch_sizes: list[int], max_tokens: int, out_dir: str) -> list[dict]:
    model = load_model(model_name)
    sampling = model.default_sampling.replace(max_tokens=max_tokens, ignore_eos=True)
    rate = model.timing.sample_rate
    rows = [_baseline(model_name, model, sampling, num_requests=min(4, max(batch_sizes)))]
    for batch_size in batch_sizes:
        config = EngineConfig(model=model_name, cache=CacheConfig(kv_cache_mb=512),
                              scheduler=SchedulerConfig(policy="offline", max_num_seqs=max(batch_sizes),
                                                         max_num_batched_tokens=2048))
        engine = Engine(model, config)
        engine.generate([TEXT], sampling=sampling.replace(max_tokens=8))  # warm-up
        started = time.perf_counter()
        results = engine.generate([TEXT] * batch_size, sampling=sampling)
        elapsed = time.perf_counter() - started
        audio_s = sum(len(r.pcm) for r in results) / rate
        rows.append(_row(f"streamvox batch {batch_size}", batch_size, batch_size * max_tokens, audio_s, elapsed))
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_vs_baseline"] = round(row["tokens_per_s"] / base, 2)
    _report(rows, out_dir, model_name, max_tokens)
    return rows


def _baseline(model_name: str, model, sampling: SamplingParams, num_requests: int) -> dict:
    try:
        import transformers
        from snac import SNAC
    except ImportError as error:
        raise ValueError(f"the baseline needs the dev extras (transformers, snac): {error}") from None
    path = resolve_checkpoint(model_name)
    reference = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    codec = SNAC.from_pretrained(str(path / "snac_24khz")).eval()
    prompt = torch.tensor([model.prepare(TEXT, None)])
    started = time.perf_counter()
    audio_samples = 0
    with torch.inference_mode():
        for seed in range(num_requests):
            torch.manual_seed(seed)
            out = reference.generate(
                prompt, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                repetition_penalty=sampling.repetition_penalty, max_new_tokens=sampling.max_tokens,
                min_new_tokens=sampling.max_tokens, eos_token_id=None, pad_token_id=0,
            )[0, prompt.shape[1]:].tolist()
            builder = model.new_frame_builder()
            frames = torch.tensor([f for f in map(builder.push, out) if f])  # [F, 7]
            spf = model.timing.samples_per_frame
            for window in decode_windows(frames, 0, len(frames)):  # one window per call, as the publisher does
                audio_samples += codec.decode(split_levels(window[None]))[0, 0, spf : 2 * spf].numel()
    elapsed = time.perf_counter() - started
    rate = model.timing.sample_rate
    return _row("transformers.generate + snac (sequential)", 1, num_requests * sampling.max_tokens,
                audio_samples / rate, elapsed)


def _row(name: str, batch_size: int, tokens: int, audio_s: float, elapsed: float) -> dict:
    return {"system": name, "batch_size": batch_size, "tokens": tokens, "wall_s": round(elapsed, 3),
            "tokens_per_s": round(tokens / elapsed, 1), "x_real_time": round(audio_s / elapsed, 2)}


def _report(rows: list[dict], out_dir: str, model_name: str, max_tokens: int) -> None:
    header = f"{'system':<44}{'batch':>6}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'x real-time':>12}{'speedup':>9}"
    print(f"throughput on {model_name}, {max_tokens} tokens per request, {torch.get_num_threads()} CPU threads")
    print(header)
    for r in rows:
        print(f"{r['system']:<44}{r['batch_size']:>6}{r['tokens']:>8}{r['wall_s']:>9}{r['tokens_per_s']:>9}"
              f"{r['x_real_time']:>12}{r['speedup_vs_baseline']:>9}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_name, "max_tokens": max_tokens, "threads": torch.get_num_threads()}
    (out / "throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([r["system"].replace(" (sequential)", "\n(sequential)") for r in rows], [r["tokens_per_s"] for r in rows])
    ax.set_ylabel("tokens / s")
    ax.set_title(f"Offline throughput, {model_name}")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    print(f"wrote {out / 'throughput.json'} and {out / 'throughput.png'}")

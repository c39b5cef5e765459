"""Command line: `streamvox serve | synth | batch | make-tiny | bench`."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time

from streamvox.config import (
    ATTENTION_BACKENDS,
    DEVICE_HELP,
    DTYPES,
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
    ServerConfig,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamvox", description="Streaming serving engine for speech LMs")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the HTTP API (OpenAI /v1/audio/speech, VoxServe /generate)")
    serve.add_argument("--model", default="tiny-orpheus", help="checkpoint directory, hub id, or tiny-<family>")
    serve.add_argument("--codec", default=None, help="codec directory or hub id (default: the family's)")
    _add_device_flags(serve)
    serve.add_argument("--engine", choices=["streamvox", "naive"], default="streamvox",
                       help="naive: the one-request-at-a-time transformers + codec-package baseline, for benchmarks")
    serve.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (default: half the cores)")
    for config_type in (ServerConfig, SchedulerConfig, CacheConfig):
        _add_flags(serve, config_type)

    synth = commands.add_parser("synth", help="speak one text into a WAV file")
    synth.add_argument("text")
    synth.add_argument("-o", "--output", default="out.wav")
    synth.add_argument("--model", default="tiny-orpheus", help="checkpoint directory, hub id, or tiny-<family>")
    synth.add_argument("--codec", default=None, help="codec directory or hub id (default: the family's)")
    synth.add_argument("--voice", default=None)
    synth.add_argument("--seed", type=int, default=None)
    synth.add_argument("--temperature", type=float, default=None)
    synth.add_argument("--top-p", type=float, default=None)
    synth.add_argument("--top-k", type=int, default=None)
    synth.add_argument("--repetition-penalty", type=float, default=None)
    synth.add_argument("--max-tokens", type=int, default=None)
    _add_device_flags(synth)

    batch = commands.add_parser("batch", help="speak every line of a JSONL file into audio files (resumable)")
    batch.add_argument("texts", help='JSONL, one object a line: {"id": "intro", "text": "Hello."} (id, voice, '
                                     "seed, max_tokens optional)")
    batch.add_argument("--out", required=True, help="directory for the audio files and manifest.jsonl")
    batch.add_argument("--model", default="tiny-orpheus", help="checkpoint directory, hub id, or tiny-<family>")
    batch.add_argument("--format", default="wav", help="wav, flac, mp3, opus, aac or pcm")
    batch.add_argument("--max-num-seqs", type=int, default=32, help="requests generated at once")
    batch.add_argument("--ray", action="store_true", help="run on Ray Data (pip install 'streamvox[ray]')")
    batch.add_argument("--address", default=None, help="--ray: a running Ray cluster's address (default: start one)")
    batch.add_argument("--engines", type=int, default=0,
                       help="--ray: engine actors (default: one per GPU of the cluster, else 1)")
    _add_device_flags(batch)

    tiny = commands.add_parser("make-tiny", help="write a random-weight test checkpoint in the publisher layout")
    tiny.add_argument("family", help="the family to write (orpheus, csm, qwen3-tts, ...: a wrong name lists them)")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--shards", type=int, default=1, help="number of safetensors shards")
    tiny.add_argument("--size", choices=["tiny", "full"], default="tiny",
                      help="full: the real model's config and no weights (drawn on the device from the seed)")

    bench = commands.add_parser("bench", help="benchmarks (print a table, write JSON and a plot)")
    bench.add_argument("name", choices=["serve", "offline", "streams", "gpu"])
    bench.add_argument("--model", default="tiny-orpheus")
    _add_device_flags(bench)
    bench.add_argument("--size", choices=["full", "tiny"], default="full",
                       help="gpu: full-size random-weight models (Orpheus-3B, CSM-1B, Qwen3-TTS-1.7B) or the tiny ones")
    bench.add_argument("--time-budget", type=float, default=400.0, help="gpu: seconds for all phases together")
    bench.add_argument("--batch-sizes", default="1,8,32", help="offline: requests at once")
    bench.add_argument("--max-tokens", type=int, default=None, help="tokens per request (offline 280, streams 280)")
    bench.add_argument("--policies", default="streaming,fcfs", help="streams: scheduling policies to compare")
    bench.add_argument("--streams", default="1,4,8,16", help="streams: concurrency levels")
    bench.add_argument("--rounds", type=int, default=2, help="streams: requests each client sends in turn")
    bench.add_argument("--url", action="append", default=[],
                       help="serve: a running server, as URL or NAME=URL (repeatable)")
    bench.add_argument("--systems", default="",
                       help="serve: local servers to start one at a time, from streaming, fcfs, offline, naive; "
                            "NAME@RATE skips rates below RATE for that one")
    bench.add_argument("--rates", default="0.025,0.05,0.1,0.2,0.4,0.6,0.8,1,1.25,1.5,2",
                       help="serve: arrival rates (req/s)")
    bench.add_argument("--num-requests", type=int, default=20, help="serve: requests per rate, at most")
    bench.add_argument("--min-requests", type=int, default=10, help="serve: requests per rate, at least")
    bench.add_argument("--window", type=float, default=300.0,
                       help="serve: at low rates send rate x WINDOW requests (at least --min-requests)")
    bench.add_argument("--burstiness", type=float, default=1.0, help="serve: Gamma shape (1 = Poisson)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--slo", type=float, default=0.5, help="serve: p90 TTFA target (s)")
    bench.add_argument("--no-capacity", action="store_true",
                       help="serve: skip measuring the engine's offline capacity for the request mix")
    bench.add_argument("--prebuffer", type=float, default=0.0, help="serve: client prebuffer (s)")
    bench.add_argument("--api", choices=["openai", "generate"], default="openai",
                       help="serve: /v1/audio/speech or VoxServe's /generate form")
    bench.add_argument("--tokens-per-second", type=float, default=82.0,
                       help="serve: LM tokens per second of audio, for max_tokens (Orpheus: 82)")
    bench.add_argument("--serve-args", default="",
                       help="serve, streams: more flags for the servers the benchmark starts, e.g. "
                            "'--realtime-headroom 0.85'")
    bench.add_argument("--out", default="bench-results")

    args = parser.parse_args(argv)
    try:
        commands = {"serve": _serve, "synth": _synth, "batch": _batch, "make-tiny": _make_tiny, "bench": _bench}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"streamvox: error: {error}", file=sys.stderr)
        return 2


def _add_device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="of the backbone and KV cache (auto: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS,
                        help="attention backend: gather (copies each row's context; the CPU's), triton (reads the "
                             "paged cache in place; auto picks it on CUDA)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="run decode steps eagerly instead of replaying CUDA graphs (CUDA + triton only)")


def _add_flags(parser: argparse.ArgumentParser, config_type: type) -> None:
    """One --flag per field of a config dataclass, typed and defaulted from the field; a tuple field is a flag
    given once per value (its name in the field's metadata)."""
    for field in dataclasses.fields(config_type):
        default = field.default
        if isinstance(default, tuple):
            parser.add_argument(f"--{field.metadata['flag']}", dest=field.name, action="append", default=[],
                                help="(repeatable)")
            continue
        kind = type(default) if default is not None else str
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=default,
                            help=f"(default: {default})")


def _from_flags(config_type: type, args: argparse.Namespace):
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(config_type)}
    return config_type(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})


def _serve(args) -> int:
    import uvicorn

    from streamvox.server.app import create_app
    from streamvox.server.connection import guarded_protocol

    scheduler = _from_flags(SchedulerConfig, args)
    scheduler.validate()
    engine = EngineConfig(model=args.model, engine=args.engine, codec=args.codec, device=args.device,
                          dtype=args.dtype, num_threads=args.num_threads, attention=args.attention,
                          cuda_graphs=args.cuda_graphs, cache=_from_flags(CacheConfig, args), scheduler=scheduler)
    server = _from_flags(ServerConfig, args)
    if args.model.startswith("tiny-"):
        print(f"note: {args.model} has random weights and makes noise, not speech; pass --model DIR for a real "
              "checkpoint", file=sys.stderr)
    try:
        app = create_app(engine, server)
    except ValueError as error:  # e.g. --data-parallel 0
        print(error, file=sys.stderr)
        return 2
    uvicorn.run(app, host=server.host, port=server.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=5,
                http=guarded_protocol(server.read_timeout_s, server.read_idle_timeout_s))
    return 1 if app.state.engine.status == "failed" else 0


def _synth(args) -> int:
    from streamvox.audio import write_wav
    from streamvox.engine.local import Engine

    engine = Engine.from_pretrained(args.model, codec=args.codec, device=args.device, dtype=args.dtype,
                                    attention=args.attention, cuda_graphs=args.cuda_graphs)
    if engine.model.is_random_weights:
        print(f"note: {args.model} has random weights and makes noise, not speech; pass --model DIR for a real "
              "checkpoint", file=sys.stderr)
    sampling = engine.model.default_sampling.replace(
        seed=args.seed, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens,
    )
    started = time.perf_counter()
    result = engine.result(engine.submit(args.text, args.voice, sampling))
    elapsed = time.perf_counter() - started
    write_wav(args.output, result.pcm, result.sample_rate)
    seconds = len(result.pcm) / result.sample_rate
    print(f"wrote {args.output}: {result.sample_rate} Hz mono, {result.num_frames} frames, "
          f"{len(result.pcm)} samples, {seconds:.2f} s of audio in {elapsed:.2f} s "
          f"({len(result.step_tokens)} tokens, finish: {result.finish_reason})")
    return 0


def _batch(args) -> int:
    if args.ray:
        try:
            from streamvox.deploy.ray_data import run_batch_on_ray
        except ImportError as error:
            print(f"--ray needs Ray ({error}); pip install 'streamvox[ray]'", file=sys.stderr)
            return 2
        summary = run_batch_on_ray(args.texts, args.out, args.model, args.format, args.max_num_seqs,
                                   device=args.device, dtype=args.dtype, address=args.address, engines=args.engines)
        return 130 if summary.get("interrupted") else 1 if summary["failed"] else 0
    from streamvox.jobs import run_batch

    summary = run_batch(args.texts, args.out, args.model, args.format, args.max_num_seqs, device=args.device,
                        dtype=args.dtype, attention=args.attention, cuda_graphs=args.cuda_graphs)
    return 1 if summary["failed"] else 0


def _make_tiny(args) -> int:
    from streamvox.models.registry import family_named

    family_named(args.family)  # ValueError naming the families when it is unknown
    if args.size == "full":
        from streamvox.models.full_size import write_full

        path = write_full(args.family, args.directory, seed=args.seed)
        print(f"wrote a full-size {args.family} config without weights to {path}: they are drawn on the device from "
              f"seed {args.seed} when it loads (it makes noise, not speech)")
        return 0
    path = family_named(args.family).write_tiny(args.directory, seed=args.seed, num_shards=args.shards)
    print(f"wrote a random-weight tiny {args.family} checkpoint to {path} (it makes noise, not speech)")
    return 0


def _server_flags(args) -> list[str]:
    return ["--device", args.device, "--dtype", args.dtype, *shlex.split(args.serve_args)]


def _bench(args) -> int:
    if args.name == "serve":
        from streamvox.bench.serve import SYSTEMS, LoadSpec, realtime_capacity, run_serve

        systems = {name: float(rate or 0) for name, _, rate in
                   (item.partition("@") for item in args.systems.split(",") if item)}
        unknown = set(systems) - set(SYSTEMS)
        if unknown or not (systems or args.url):
            raise ValueError(f"give --url or --systems from {sorted(SYSTEMS)} (unknown: {sorted(unknown)})")
        targets = dict(url.split("=", 1) if "=" in url else ("server", url) for url in args.url)
        spec = LoadSpec(tuple(float(rate) for rate in args.rates.split(",")), args.num_requests, args.min_requests,
                        args.window, args.burstiness, args.seed, args.slo, args.prebuffer, args.api,
                        args.tokens_per_second)
        capacity = None if args.no_capacity else realtime_capacity(spec, args.model, args.device, args.dtype)
        run_serve(spec, args.out, targets, systems, args.model, _server_flags(args), capacity)
        return 0
    if args.name == "gpu":
        from streamvox.bench.gpu import run_gpu

        run_gpu(args.out, args.device, args.dtype, args.size, args.time_budget)
        return 0
    if args.name == "streams":
        from streamvox.bench.streams import run_streams

        levels = [int(level) for level in args.streams.split(",")]
        run_streams(args.model, args.policies.split(","), levels, args.rounds, args.max_tokens or 280, args.out,
                    _server_flags(args))
        return 0
    from streamvox.bench.offline import run_offline

    sizes = [int(size) for size in args.batch_sizes.split(",")]
    run_offline(args.model, sizes, args.max_tokens or 280, args.out, args.device, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())

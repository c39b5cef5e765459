"""Command line: `streamvox synth | make-tiny | bench`."""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamvox", description="Streaming serving engine for speech LMs")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="speak one text into a WAV file")
    synth.add_argument("text")
    synth.add_argument("-o", "--output", default="out.wav")
    synth.add_argument("--model", default="tiny-orpheus", help="checkpoint directory, hub id, or tiny-orpheus")
    synth.add_argument("--codec", default=None, help="codec directory or hub id (default: the family's)")
    synth.add_argument("--voice", default=None)
    synth.add_argument("--seed", type=int, default=None)
    synth.add_argument("--temperature", type=float, default=None)
    synth.add_argument("--top-p", type=float, default=None)
    synth.add_argument("--top-k", type=int, default=None)
    synth.add_argument("--repetition-penalty", type=float, default=None)
    synth.add_argument("--max-tokens", type=int, default=None)

    tiny = commands.add_parser("make-tiny", help="write a random-weight test checkpoint in the publisher layout")
    tiny.add_argument("family", choices=["orpheus"])
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--shards", type=int, default=1, help="number of safetensors shards")

    bench = commands.add_parser("bench", help="benchmarks (print a table, write JSON and a plot)")
    bench.add_argument("name", choices=["throughput"])
    bench.add_argument("--model", default="tiny-orpheus")
    bench.add_argument("--batch-sizes", default="1,8,32")
    bench.add_argument("--max-tokens", type=int, default=140)
    bench.add_argument("--out", default="bench-results")

    args = parser.parse_args(argv)
    try:
        return {"synth": _synth, "make-tiny": _make_tiny, "bench": _bench}[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"streamvox: error: {error}", file=sys.stderr)
        return 2


def _synth(args) -> int:
    from streamvox.audio import write_wav
    from streamvox.engine.core import Engine

    engine = Engine.from_pretrained(args.model, codec=args.codec)
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
          f"({len(result.token_ids)} tokens, finish: {result.finish_reason})")
    return 0


def _make_tiny(args) -> int:
    from streamvox.models.registry import TINY_WRITERS

    path = TINY_WRITERS[args.family](args.directory, seed=args.seed, num_shards=args.shards)
    print(f"wrote a random-weight tiny {args.family} checkpoint to {path} (it makes noise, not speech)")
    return 0


def _bench(args) -> int:
    from streamvox.bench.throughput import run_throughput

    sizes = [int(size) for size in args.batch_sizes.split(",")]
    run_throughput(args.model, sizes, args.max_tokens, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`streamvox batch TEXTS.jsonl --out DIR --ray`: the offline batch on Ray Data, on this machine or a cluster.

The same input, output files, manifest and resumption as the local batch (streamvox/jobs.py), in three stages
that Ray Data streams partitions through:

1. text preparation, a CPU stage (`prepare_actors` actors, each with the checkpoint on its CPU): the checks
   that need the model (voice, sampling limits) and the prompt of each line;
2. generation in a pool of engine actors, one per GPU (`engines` of them on a CPU machine), each an offline
   engine that runs a partition's prompts together and returns the encoded files;
3. the driver, which writes each file and its manifest line as partitions arrive, so an interrupted run
   resumes where it stopped. SIGINT or SIGTERM stops it between two files and shuts down the Ray it started.

The result of an item depends only on its text, voice and seed, so the files equal the local batch's.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import sys
import threading

import ray

from streamvox.config import SchedulerConfig
from streamvox.engine.requests import check_request
from streamvox.jobs import (
    Progress,
    checked_item,
    encode_item,
    generate,
    offline_engine,
    plan_batch,
    store,
    summarize,
    write_rejected,
)
from streamvox.runner.weights import load_model

ROWS_PER_PARTITION = 16  # prompts an engine actor runs together (and the driver's unit of progress)


class Preparer:
    """Stage 1 (CPU): each line's checks and prompt."""

    def __init__(self, model: str) -> None:
        self.model = load_model(model, device="cpu")
        self.max_audio_s = SchedulerConfig().max_audio_s

    def __call__(self, rows: dict) -> dict:
        items, prepared, errors = [], [], []
        for record in rows["record"]:
            record = json.loads(record)
            try:
                item = checked_item(record, lambda text, voice, overrides: check_request(
                    self.model, text, voice, overrides, self.max_audio_s))
                prompt = self.model.prepare_request(item.text, item.voice)
                items.append(pickle.dumps(item))
                prepared.append(pickle.dumps(prompt))
                errors.append("")
            except ValueError as error:
                items.append(b"")
                prepared.append(b"")
                errors.append(str(error))
        return {**rows, "item": items, "prepared": prepared, "error": errors}


class Generator:
    """Stage 2: an engine actor; a partition's prompts in, their encoded audio files out."""

    def __init__(self, model: str, fmt: str, max_num_seqs: int, device: str, dtype: str) -> None:
        self.engine = offline_engine(model, max_num_seqs, device, dtype)
        self.fmt = fmt

    def __call__(self, rows: dict) -> dict:
        ready = [i for i, error in enumerate(rows["error"]) if not error]
        items = [pickle.loads(rows["item"][i]) for i in ready]
        prompts = [pickle.loads(rows["prepared"][i]) for i in ready]
        row_of = {item.item_id: row for row, item in zip(ready, items, strict=True)}
        by_index = {}
        for item, result, error in generate(self.engine, items, prompts):
            by_index[row_of[item.item_id]] = encode_item(item, result, self.fmt) if result is not None else error
        names, data, records, errors = [], [], [], list(rows["error"])
        for index in range(len(errors)):
            outcome = by_index.get(index)
            name, audio, manifest = outcome if isinstance(outcome, tuple) else ("", b"", {})
            if isinstance(outcome, str):
                errors[index] = f"failed: {outcome}"
            names.append(name)
            data.append(audio)
            records.append(json.dumps(manifest))
        return {"number": rows["number"], "file": names, "data": data, "manifest": records, "error": errors}


def run_batch_on_ray(texts_path: str, out_dir: str, model: str = "tiny-orpheus", fmt: str = "wav",
                     max_num_seqs: int = 32, stream=sys.stderr, device: str = "auto", dtype: str = "auto",
                     address: str | None = None, engines: int = 0, prepare_actors: int = 1) -> dict:
    """The batch on Ray Data (see the module's docstring); `address`: a running cluster's (default: start one
    on this machine); `engines`: engine actors (default: one per GPU the cluster has, else 1)."""
    plan = plan_batch(texts_path, out_dir, fmt, stream)
    failed: list[str] = []
    progress = Progress(0, stream)
    if plan.todo:
        is_ours = not ray.is_initialized()
        if is_ours:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("STREAMVOX_")}})
        progress = Progress(len(plan.todo), stream)
        try:
            with _stopped_by_signals() as stop:
                _run(plan, _dataset(plan, model, fmt, max_num_seqs, device, dtype, engines, prepare_actors),
                     progress, failed, stop)
        except KeyboardInterrupt:
            progress.report(f"interrupted after {progress.num_done} items; run the same command again to resume")
            return {**summarize(plan, progress, failed, stream), "interrupted": True}
        finally:
            if is_ours:
                ray.shutdown()
    write_rejected(plan, stream)
    return summarize(plan, progress, failed, stream)


def _dataset(plan, model: str, fmt: str, max_num_seqs: int, device: str, dtype: str, engines: int,
             prepare_actors: int):
    gpus = int(ray.cluster_resources().get("GPU", 0))
    rows = [{"number": number, "record": json.dumps(record)} for number, record in plan.todo]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // ROWS_PER_PARTITION)))
    dataset = dataset.map_batches(Preparer, fn_constructor_kwargs={"model": model}, batch_size=None,
                                  num_cpus=1, compute=ray.data.ActorPoolStrategy(size=prepare_actors))
    return dataset.map_batches(
        Generator, fn_constructor_kwargs={"model": model, "fmt": fmt, "max_num_seqs": max_num_seqs,
                                          "device": device, "dtype": dtype},
        batch_size=None, num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
        compute=ray.data.ActorPoolStrategy(size=engines or max(1, gpus)))


def _run(plan, dataset, progress: Progress, failed: list[str], stop: threading.Event) -> None:
    with open(plan.manifest_path, "a", encoding="utf-8") as manifest:
        todo = dict(plan.todo)  # line number -> record
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            _store_partition(plan, todo, manifest, batch, progress, failed)
            if stop.is_set():  # the signal's KeyboardInterrupt may have been raised (and lost) inside Ray
                raise KeyboardInterrupt


@contextlib.contextmanager
def _stopped_by_signals():
    """SIGINT and SIGTERM stop the run between files (what is written stays written) and shut Ray down."""
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _store_partition(plan, todo: dict[int, dict], manifest, batch: dict, progress: Progress,
                     failed: list[str]) -> None:
    for number, name, data, record, error in zip(batch["number"], batch["file"], batch["data"], batch["manifest"],
                                                 batch["error"], strict=True):
        if error.startswith("failed: "):
            failed.append(todo[int(number)]["id"])
            progress.report(f"item {todo[int(number)]['id']!r} {error}")
        elif error:
            plan.rejected.append({"line": int(number), "error": error, "content": json.dumps(todo[int(number)])[:200]})
        else:
            store(plan, manifest, str(name), bytes(data), json.loads(record), progress)

"""The GPU path's attention and decode graphs, checked on the CPU.

The Triton kernel runs here under Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), for decode rows
and prefill chunks over cached prefixes, on random block tables, ragged context lengths, GQA ratios and padded
rows, against attention computed row by row in float64. The static-buffer decode runner (what CUDA graphs
replay) runs its padded buffers eagerly here: it must give exactly the eager engine's tokens, and its padded rows
must write nothing but the scratch block."""

import os

import numpy as np
import pytest
import torch

from streamvox.layers import attention
from streamvox.runner.lm_runner import LMRunner

TEXTS = ["Hi.", "Short one here.", "A somewhat longer sentence to make the prompt grow.",
         "Numbers: one, two, three, four, five.", "The quick brown fox jumps over the lazy dog.", "Okay!",
         "Please read this sentence slowly, with a calm voice, and pause at every comma."]

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")


def reference(q, k_cache, v_cache, tables, lens, scale):
    """Each row's attention over its own context, gathered position by position, in float64."""
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    out = []
    for row, length in enumerate(lens.tolist()):
        slots = [(int(tables[row, p // block_size]), p % block_size) for p in range(length)]
        keys = torch.stack([k_cache[b, o] for b, o in slots]).double().repeat_interleave(group, 1)  # [L, Hq, D]
        values = torch.stack([v_cache[b, o] for b, o in slots]).double().repeat_interleave(group, 1)
        weights = (torch.einsum("hd,lhd->hl", q[row].double(), keys) * scale).softmax(-1)
        out.append(torch.einsum("hl,lhd->hd", weights, values))
    return torch.stack(out)


CASES = [  # (query heads, KV heads, head dim, block size, dtype)
    (2, 1, 64, 16, torch.float32),  # tiny Orpheus
    (24, 8, 128, 16, torch.float32),  # Orpheus-3B's ratio and head size
    (12, 4, 48, 16, torch.float32),  # a head size that is no power of two
    (8, 8, 32, 32, torch.float32),  # no grouping, bigger blocks
    (32, 8, 64, 16, torch.bfloat16),
]


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block_size", "dtype"), CASES)
def test_the_kernel_attends_like_the_reference(heads, kv_heads, dim, block_size, dtype):
    from streamvox.layers.triton_attention import paged_decode

    generator = torch.Generator().manual_seed(heads * dim + block_size)
    num_blocks, rows = 48, 7
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    # ragged: a lone position, block edges either side, several tiles; the last two rows are padded rows (one
    # position in block 0, as the graphs' scratch rows are)
    lens = torch.tensor([1, block_size, block_size + 1, 5 * block_size - 3, 7 * block_size, 1, 1])
    tables = torch.stack([torch.randperm(num_blocks, generator=generator)[:12] for _ in range(rows)])
    tables[-2:, 0] = 0
    q = torch.randn(rows, heads, dim, generator=generator).to(dtype)
    scale = dim**-0.5
    got = paged_decode(q, k_cache, v_cache, tables, lens, scale)
    want = reference(q, k_cache, v_cache, tables, lens, scale)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype and got.shape == q.shape
    assert (got.double() - want).abs().max().item() < tolerance
    # the PyTorch fallback (CUDA-less machines without the interpreter) computes the same thing
    fallback = attention.paged_decode_torch(q, k_cache, v_cache, tables, lens, scale)
    assert (fallback.double() - want).abs().max().item() < tolerance


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block_size", "dtype"), CASES[1:])
def test_prefill_chunks_attend_causally_over_their_cached_prefix(heads, kv_heads, dim, block_size, dtype,
                                                                 monkeypatch):
    """Chunks of 1, 16, 23 and 40 tokens starting at positions 0, 5, 31 and 64 of their sequences (the ones not at
    0 continue a prefix already in the cache), cut into tiles of 16: every token sees exactly its own positions
    0 .. itself."""
    from streamvox.layers.triton_attention import paged_prefill

    generator = torch.Generator().manual_seed(heads + dim)
    num_blocks = 64
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    chunks = [(1, 0), (16, 5), (23, 31), (40, 64)]  # (tokens, start position)
    tables = torch.stack([torch.randperm(num_blocks, generator=generator)[:16] for _ in chunks])
    total = sum(count for count, _ in chunks) + 3  # 3 rows of decode tokens in front, left alone
    q = torch.randn(total, heads, dim, generator=generator).to(dtype)
    tiles, first = [], 3
    for seq, (count, start) in enumerate(chunks):
        tiles += [[first + i, min(16, count - i), seq, start + i + 1] for i in range(0, count, 16)]
        first += count
    out = torch.full_like(q, 7.0)
    paged_prefill(q, k_cache, v_cache, tables, torch.tensor(tiles), out, dim**-0.5)
    assert (out[:3] == 7.0).all()
    token_tables, lens = [], []
    for seq, (count, start) in enumerate(chunks):  # each prefill token as a row of its own
        token_tables += [tables[seq]] * count
        lens += [start + i + 1 for i in range(count)]
    want = reference(q[3:], k_cache, v_cache, torch.stack(token_tables), torch.tensor(lens), dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out[3:].double() - want).abs().max().item() < tolerance
    monkeypatch.delenv("TRITON_INTERPRET")  # the PyTorch way, for CUDA-less machines without the interpreter
    fallback = torch.full_like(q, 7.0)
    attention.paged_prefill(q, k_cache, v_cache, tables, torch.tensor(tiles), fallback, dim**-0.5)
    assert (fallback[:3] == 7.0).all() and (fallback[3:].double() - want).abs().max().item() < tolerance


def test_a_batch_of_prefills_and_decodes_is_the_same_on_both_backends(tiny_model):
    """The same steps (one long prompt in two chunks beside decoding rows) through each backend's runner: logits
    agree to float rounding and the greedy tokens are the same."""
    from streamvox.batch import NewRequest, ScheduledRow, StepBatch
    from streamvox.config import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True, seed=0)
    prompts = [tiny_model.prepare(text, None) for text in TEXTS[:4]]
    logits, tokens = {}, {}
    for backend in ("gather", "triton"):
        runner = LMRunner(tiny_model, 64, 16, torch.float32, attention=backend)
        news = tuple(NewRequest(f"r{i}", tuple(p), greedy, 0) for i, p in enumerate(prompts))
        blocks = {f"r{i}": tuple(range(16 * i, 16 * i + 16)) for i in range(4)}
        rows = tuple(ScheduledRow(f"r{i}", 0, len(prompts[i]), blocks[f"r{i}"], True) for i in range(3))
        out = [runner.execute(StepBatch(news, rows, ()))]
        lengths = {f"r{i}": len(prompts[i]) for i in range(3)}
        half = len(prompts[3]) // 2
        for start, count in ((0, half), (half, len(prompts[3]) - half)):  # r3 prefills beside decoding rows
            decode = tuple(ScheduledRow(r, n, 1, blocks[r], True) for r, n in lengths.items())
            out.append(runner.execute(StepBatch((), (*decode, ScheduledRow("r3", start, count, blocks["r3"],
                                                                            start > 0)), ())))
            lengths = {r: n + 1 for r, n in lengths.items()}
        tokens[backend] = [o.step_tokens for o in out]
        logits[backend] = runner.logits(ScheduledRow("r0", lengths["r0"], 1, blocks["r0"], False))
    assert tokens["gather"] == tokens["triton"]
    assert (logits["gather"] - logits["triton"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["orpheus", "csm"])
def test_decode_through_static_buffers_gives_the_eager_engines_tokens(family, engine_for, tiny_model, tmp_path):
    """Staggered requests, so steps have 1 to 7 decode rows (buckets 1, 2, 4 and 8 with padded rows) and mix with
    chunked prefills; sampled and greedy rows alike; one id per input (Orpheus) and a row of codes (CSM)."""
    if family == "orpheus":
        model, count, steps = tiny_model, 7, 14
    else:
        from streamvox.models.tiny.csm import write_tiny
        from streamvox.runner.weights import load_model

        model, count, steps = load_model(str(write_tiny(tmp_path / "csm"))), 4, 5
    samplings = [model.default_sampling.replace(seed=20 + i, max_tokens=steps + 3 * i, ignore_eos=True)
                 for i in range(count)]
    runs = []
    for graph_rows in (0, 8):
        engine = engine_for(model, max_num_batched_tokens=32)  # long prompts prefill in chunks beside decodes
        if graph_rows:  # decode rows through the static buffers CUDA graphs replay (eagerly, on the CPU)
            engine.lm_runner = LMRunner(model, engine.pool.num_blocks, engine.lm_runner.block_size, torch.float32,
                                        attention="triton", graph_rows=graph_rows, max_context=256)
        ids = []
        for i, sampling in enumerate(samplings):
            ids.append(engine.submit(TEXTS[i], None, sampling))
            for _ in range(3):
                engine.step()
        runs.append([engine.result(i) for i in ids])
        if graph_rows:  # padded rows ran, and wrote their scratch block
            assert engine.lm_runner.kv_cache[:, :, engine.pool.num_blocks].abs().sum() > 0
    for eager, static in zip(*runs, strict=True):
        assert static.step_tokens == eager.step_tokens
        assert np.abs(static.pcm - eager.pcm).max() <= 1e-5


def test_padded_rows_write_only_the_scratch_block(tiny_model):
    from streamvox.batch import NewRequest, ScheduledRow, StepBatch
    from streamvox.config import SamplingParams

    num_blocks = 32
    runner = LMRunner(tiny_model, num_blocks, 16, torch.float32, attention="triton", graph_rows=8, max_context=128)
    assert runner.graphs.bucket(3) == 4 and runner.graphs.bucket(8) == 8 and runner.graphs.bucket(1) == 1
    sampling = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, seed=0)
    prompts = {name: tiny_model.prepare(text, None) for name, text in zip("abc", TEXTS[1:4], strict=True)}
    tables = {name: tuple(range(4 * i, 4 * i + 4)) for i, name in enumerate("abc")}
    runner.execute(StepBatch(tuple(NewRequest(n, tuple(p), sampling, 0) for n, p in prompts.items()),
                             tuple(ScheduledRow(n, 0, len(p), tables[n], True) for n, p in prompts.items()), ()))
    before = runner.kv_cache.clone()
    runner.execute(StepBatch((), tuple(ScheduledRow(n, len(p), 1, tables[n], True) for n, p in prompts.items()),
                             ()))  # 3 rows: bucket 4, one padded row
    written = (runner.kv_cache != before).flatten(3).any(-1).any(0).any(0).nonzero().flatten().tolist()
    assert written == sorted([tables[n][len(p) // 16] for n, p in prompts.items()] + [num_blocks])


def test_rows_longer_than_the_graphs_tables_run_eagerly(tiny_model):
    """A decode row past the static tables' reach (here 32 positions) is not squeezed into them: the step runs
    eagerly and samples what the gather backend samples."""
    from streamvox.batch import NewRequest, ScheduledRow, StepBatch
    from streamvox.config import SamplingParams

    sampling = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, seed=0)
    prompt = tiny_model.prepare(" ".join(TEXTS[2:]), None)
    assert 32 < len(prompt) < 120
    tokens = []
    for options in ({"attention": "gather"}, {"attention": "triton", "graph_rows": 4, "max_context": 32}):
        runner = LMRunner(tiny_model, 16, 16, torch.float32, **options)
        table = tuple(range(8))
        out = [runner.execute(StepBatch((NewRequest("a", tuple(prompt), sampling, 0),),
                                        (ScheduledRow("a", 0, len(prompt), table, True),), ()))]
        out += [runner.execute(StepBatch((), (ScheduledRow("a", len(prompt) + i, 1, table, True),), ()))
                for i in range(3)]
        tokens.append([o.step_tokens for o in out])
    assert tokens[0] == tokens[1]
    assert runner.graphs.max_context == 32 and runner.kv_cache[:, :, 16].abs().sum() == 0  # scratch untouched


def test_the_backend_is_chosen_by_what_can_run():
    cpu = torch.device("cpu")
    assert attention.resolve_backend("auto", cpu) == "gather"  # the CPU's, whatever is installed
    assert attention.resolve_backend("triton", cpu, 32) == "triton"
    with pytest.raises(ValueError, match="block-size of at least 16"):
        attention.resolve_backend("triton", cpu, 8)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.resolve_backend("flash", cpu)


COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from streamvox.layers.triton_attention import MIN_DOT, _paged_attention_kernel as kernel

for arch, dtype, group, tokens, head_dim in [(90, "bf16", 3, 1, 128), (90, "bf16", 3, 16, 128), (90, "fp32", 3, 1, 128),
                                             (90, "fp16", 2, 16, 64), (80, "bf16", 4, 1, 64), (80, "bf16", 1, 16, 128)]:
    signature = {name: "*" + dtype if name in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr") else "*i64"
                 for name in kernel.arg_names[:7]}
    signature |= {"scale": "fp32"} | {name: "i32" for name in kernel.arg_names[8:16]}
    constants = dict(GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), MIN_DOT // tokens), TOKENS=tokens,
                     HEAD_DIM=head_dim, DIM_PAD=head_dim, BLOCK_SIZE=16, NATIVE=dtype != "fp32")
    signature |= {name: "constexpr" for name in constants}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
    options = {"num_warps": 4 if tokens == 1 else 8}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    assert "mma" in compiled.asm["ptx"] or dtype == "fp32", (arch, dtype)
    print("compiled", arch, dtype, group, tokens, head_dim, flush=True)
"""


def test_the_kernel_compiles_for_the_gpus_it_serves_on():
    """The interpreter checks what the kernel computes, not that it compiles: here it is compiled for an H100/H200
    (sm_90) and an A100 (sm_80), decode and prefill, 16-bit and fp32, without a GPU (Triton's own ptxas)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter would stand in
    done = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 6

"""Device and precision: `--device` / `--dtype` resolved against this machine, RoPE kept in fp32."""

import copy
import math

import pytest
import torch

from streamvox.layers.rotary import RotaryEmbedding
from streamvox.runner.device import resolve_device, resolve_dtype

LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def test_auto_picks_cuda_and_bf16_only_where_there_is_a_gpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_asking_for_a_gpu_that_is_not_there_says_what_to_do():
    with pytest.raises(ValueError, match="--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="float32, bfloat16"):
        resolve_dtype("float64", torch.device("cpu"))


def test_bf16_rope_angles_stay_within_bf16_rounding_of_fp32_up_to_position_8192():
    rope = RotaryEmbedding(128, 500000.0, LLAMA3)
    cast = copy.deepcopy(rope).to(torch.bfloat16)  # what casting a whole model does to its modules
    assert cast.inv_freq.dtype == torch.float32
    generator = torch.Generator().manual_seed(0)
    positions = torch.cat([torch.arange(0, 64), torch.randint(64, 8193, (448,), generator=generator),
                           torch.tensor([8191, 8192])])
    q = torch.randn(len(positions), 4, 128, generator=generator)
    k = torch.randn(len(positions), 2, 128, generator=generator)
    q16, k16 = q.bfloat16(), k.bfloat16()
    reference_q, reference_k = rope(q16.float(), k16.float(), positions)  # fp32 rotation of the same inputs
    got_q, got_k = cast(q16, k16, positions)
    # each output is q*cos + q'*sin with cos, sin and the products rounded to bf16: a few units of bf16 rounding
    # (2^-8 relative) of the largest term
    bound = 4 * 2**-8 * q.abs().max().item()
    assert (got_q.float() - reference_q).abs().max().item() <= bound
    assert (got_k.float() - reference_k).abs().max().item() <= bound
    # a bf16 frequency table, as casting it with the module would give, is off by whole radians at these positions
    angle_error = (positions[-1] * (rope.inv_freq.bfloat16().float() - rope.inv_freq)).abs().max().item()
    assert angle_error > 1.0
    assert math.isfinite(angle_error)


def test_a_model_loaded_in_bf16_keeps_its_rope_table_in_fp32(tiny_dir):
    from streamvox.runner.weights import load_model

    model = load_model(str(tiny_dir), dtype="bfloat16", device="cpu")
    assert model.backbone.lm_head.weight.dtype == torch.bfloat16
    assert model.backbone.model.rotary.inv_freq.dtype == torch.float32
    assert next(model.codec.model.parameters()).dtype == torch.float32  # SNAC decodes in fp32

"""CosyVoiceFlow against the publisher's CausalMaskedDiffWithXvec (cosyvoice-minicpmo 0.1.0, test-only), on a
tiny seeded flow.pt that both load strictly.

Reference imports that cannot be satisfied here are replaced for the test: matcha's logger helper (its package
imports lightning and hydra) and cosyvoice.utils.class_utils (it imports the LLM, HiFT and CLI modules, and
through them torchaudio, which has no build for torch 2.13); the encoder only needs four class tables from it,
which the stand-in takes from the real modules. The publisher's encoder hard-codes 512 channels for its
pre-lookahead and upsampling layers (the real width); the tiny reference gets the same classes at its width.
"""

import logging
import math
import random
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from streamvox.codecs.cosyvoice_flow import (
    COSYVOICE2_FLOW_PARAMS,
    TINY_FLOW_PARAMS,
    CosyVoiceFlow,
    FlowRequest,
    write_tiny_flow,
)

TOL = 1e-4
HOP = 25  # CosyVoice2Model.token_hop_len

pytestmark = pytest.mark.usefixtures("one_thread")


def _stub_reference_imports() -> None:
    if "matcha.utils.pylogger" not in sys.modules:
        package, pylogger = types.ModuleType("matcha.utils"), types.ModuleType("matcha.utils.pylogger")
        package.__path__ = []
        pylogger.get_pylogger = logging.getLogger
        sys.modules.setdefault("matcha.utils", package)
        sys.modules["matcha.utils.pylogger"] = pylogger
    if "cosyvoice.utils.class_utils" not in sys.modules:
        from cosyvoice.transformer import attention, embedding, subsampling

        tables = types.ModuleType("cosyvoice.utils.class_utils")
        tables.COSYVOICE_ACTIVATION_CLASSES = {"swish": torch.nn.SiLU, "relu": torch.nn.ReLU, "gelu": torch.nn.GELU}
        tables.COSYVOICE_SUBSAMPLE_CLASSES = {"linear": subsampling.LinearNoSubsampling}
        tables.COSYVOICE_EMB_CLASSES = {"rel_pos_espnet": embedding.EspnetRelPositionalEncoding}
        tables.COSYVOICE_ATTENTION_CLASSES = {"rel_selfattn": attention.RelPositionMultiHeadedAttention}
        sys.modules["cosyvoice.utils.class_utils"] = tables


@pytest.fixture(scope="module")
def ref():
    """The reference classes, as a namespace."""
    for name in ("cosyvoice", "matcha", "omegaconf", "diffusers", "conformer"):
        pytest.importorskip(name)
    _stub_reference_imports()
    from cosyvoice.flow import decoder, flow, flow_matching
    from cosyvoice.transformer import upsample_encoder
    from omegaconf import DictConfig

    return types.SimpleNamespace(DictConfig=DictConfig, flow=flow, flow_matching=flow_matching, decoder=decoder,
                                 upsample_encoder=upsample_encoder)


def build_reference(ref, params: dict):
    """CausalMaskedDiffWithXvec from the nested params, as cosyvoice2.yaml's `flow:` would build it."""
    enc, dec = params["encoder"], params["decoder"]
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # the CFM seeds every RNG for its noise
        warnings.simplefilter("ignore", FutureWarning)  # diffusers: LoRACompatibleLinear is deprecated
        encoder = ref.upsample_encoder.UpsampleConformerEncoder(**enc)
        if enc["output_size"] != 512:
            encoder.pre_lookahead_layer = ref.upsample_encoder.PreLookaheadLayer(
                channels=enc["output_size"], pre_lookahead_len=params["pre_lookahead_len"])
            encoder.up_layer = ref.upsample_encoder.Upsample1D(enc["output_size"], enc["output_size"], stride=2)
        estimator = ref.decoder.CausalConditionalDecoder(**dec["estimator"])
        cfm = ref.flow_matching.CausalConditionalCFM(
            in_channels=dec["in_channels"], n_spks=dec["n_spks"], spk_emb_dim=dec["spk_emb_dim"],
            cfm_params=ref.DictConfig(dec["cfm_params"]), estimator=estimator)
        top = {k: v for k, v in params.items() if k not in ("encoder", "decoder")}
        model = ref.flow.CausalMaskedDiffWithXvec(**top, encoder=encoder, decoder=cfm)
    random.setstate(state[0])
    np.random.set_state(state[1])
    return model


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_flow(tmp_path_factory.mktemp("cosyvoice_flow"), TINY_FLOW_PARAMS, seed=0)


@pytest.fixture(scope="module")
def reference(ref, tiny_path):
    model = build_reference(ref, TINY_FLOW_PARAMS)
    model.load_state_dict(torch.load(tiny_path, weights_only=True), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def flow(tiny_path):
    return CosyVoiceFlow.from_checkpoint(tiny_path, TINY_FLOW_PARAMS)


def make_prompt(with_prompt: bool, seed: int = 1):
    """(prompt_tokens [1, Tp], prompt_mel [1, 2 Tp, 80], speaker x-vector [1, 192])."""
    g = torch.Generator().manual_seed(seed)
    num = 11 if with_prompt else 0
    return (torch.randint(0, 6561, (1, num), generator=g), torch.randn(1, 2 * num, 80, generator=g),
            torch.randn(1, 192, generator=g))


def make_tokens(num: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 6561, (1, num), generator=torch.Generator().manual_seed(seed))


def ref_token2wav_mel(reference, tokens, prompt, streaming, finalize, token_offset=0):
    """The mel CosyVoice2Model.token2wav hands to HiFT."""
    prompt_tokens, prompt_mel, spk = prompt
    mel, _ = reference.inference(
        token=tokens, token_len=torch.tensor([tokens.shape[1]], dtype=torch.int32),
        prompt_token=prompt_tokens, prompt_token_len=torch.tensor([prompt_tokens.shape[1]], dtype=torch.int32),
        prompt_feat=prompt_mel, prompt_feat_len=torch.tensor([prompt_mel.shape[1]], dtype=torch.int32),
        embedding=spk, streaming=streaming, finalize=finalize)
    return mel[:, :, token_offset * reference.token_mel_ratio:]


def stream_calls(num_tokens: int, num_prompt_tokens: int, lookahead: int = 3):
    """CosyVoice2Model.tts(stream=True)'s token2wav calls once all tokens exist:
    [(tokens used, token_offset, streaming, finalize)], the last one non-streaming as tts() makes it."""
    calls, offset = [], 0
    pad = math.ceil(num_prompt_tokens / HOP) * HOP - num_prompt_tokens
    while True:
        hop = HOP + pad if offset == 0 else HOP
        if num_tokens - offset < hop + lookahead:
            return [*calls, (num_tokens, offset, False, True)]
        calls.append((offset + hop + lookahead, offset, True, False))
        offset += hop


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_noise_buffer_is_the_publishers(reference, flow):
    assert torch.equal(flow.decoder.rand_noise, reference.decoder.rand_noise)


def test_full_size_layout_matches_publisher(ref):
    """The real cosyvoice2.yaml sizes: same state-dict names and shapes (built on the meta device)."""
    with torch.device("meta"):
        theirs = build_reference(ref, COSYVOICE2_FLOW_PARAMS).state_dict()
        ours = CosyVoiceFlow.from_config(COSYVOICE2_FLOW_PARAMS).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_tiny_checkpoint_layout(flow, reference, tiny_path):
    saved = torch.load(tiny_path, weights_only=True)
    shapes = {k: tuple(v.shape) for k, v in saved.items()}
    assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in flow.state_dict().items()}
    CosyVoiceFlow.from_config(TINY_FLOW_PARAMS).load_state_dict(saved, strict=True)


@pytest.mark.parametrize("with_prompt", [True, False])
@pytest.mark.parametrize("streaming", [False, True])
def test_whole_utterance_parity(flow, reference, with_prompt, streaming):
    prompt, tokens = make_prompt(with_prompt), make_tokens(37)
    expected = ref_token2wav_mel(reference, tokens, prompt, streaming, finalize=True)
    got = flow.inference(tokens, *prompt, streaming=streaming, finalize=True)
    assert got.shape == (1, 80, 2 * 37) and got.dtype == torch.float32
    assert max_diff(got, expected) < TOL


@pytest.mark.parametrize("with_prompt", [True, False])
def test_streaming_chunks_parity(flow, reference, with_prompt):
    prompt, tokens = make_prompt(with_prompt), make_tokens(60)
    calls = stream_calls(60, prompt[0].shape[1])  # 11 prompt tokens: [:42], all; none: [:28], [:53], all
    assert len(calls) == (2 if with_prompt else 3) and calls[-1][2:] == (False, True)
    for used, offset, streaming, finalize in calls:
        expected = ref_token2wav_mel(reference, tokens[:, :used], prompt, streaming, finalize, offset)
        got = flow.inference(tokens[:, :used], *prompt, streaming=streaming, finalize=finalize)[:, :, 2 * offset:]
        assert max_diff(got, expected) < TOL


def test_batch_of_mixed_requests_equals_reference(flow, reference):
    """Different lengths, prompts and modes in one inference_batch call; each row equals its own reference."""
    cases = [(True, 43, True, False), (False, 30, False, True), (True, 20, True, True), (False, 28, True, False)]
    requests, expected = [], []
    for n, (with_prompt, num, streaming, finalize) in enumerate(cases):
        prompt, tokens = make_prompt(with_prompt, seed=10 + n), make_tokens(num, seed=20 + n)
        requests.append(FlowRequest(tokens[0], prompt[0][0], prompt[1][0], prompt[2][0], streaming, finalize))
        expected.append(ref_token2wav_mel(reference, tokens, prompt, streaming, finalize)[0])
    for got, want in zip(flow.inference_batch(requests), expected, strict=True):
        assert max_diff(got, want) < TOL


def test_output_depends_on_speaker_embedding(flow):
    prompt_tokens, prompt_mel, spk = make_prompt(True)
    tokens = make_tokens(30)
    a = flow.inference(tokens, prompt_tokens, prompt_mel, spk)
    b = flow.inference(tokens, prompt_tokens, prompt_mel, torch.randn(1, 192, generator=torch.Generator()))
    assert (a - b).abs().max() > 1e-2
    assert torch.isfinite(a).all()


def test_explicit_noise_replaces_the_buffer(flow):
    prompt, tokens = make_prompt(False), make_tokens(20)
    default = flow.inference(tokens, *prompt)
    same = flow.inference(tokens, *prompt, noise=flow.decoder.rand_noise[:, :, :40].clone())
    other = flow.inference(tokens, *prompt, noise=torch.randn(1, 80, 40, generator=torch.Generator()))
    assert torch.equal(default, same)
    assert (default - other).abs().max() > 1e-2


def test_two_level_estimator_parity(ref, tmp_path):
    """A U-Net with two levels (strided down / transposed up convs), which the published model does not use."""
    params = {**TINY_FLOW_PARAMS, "decoder": {**TINY_FLOW_PARAMS["decoder"], "estimator": {
        **TINY_FLOW_PARAMS["decoder"]["estimator"], "channels": [64, 64], "num_mid_blocks": 1}}}
    path = write_tiny_flow(tmp_path, params, seed=3)
    reference = build_reference(ref, params)
    reference.load_state_dict(torch.load(path, weights_only=True), strict=True)
    flow = CosyVoiceFlow.from_checkpoint(path, params)
    prompt, tokens = make_prompt(True), make_tokens(21)  # not final: 29 frames at the inner level
    for streaming, finalize in [(False, True), (True, False)]:
        expected = ref_token2wav_mel(reference.eval(), tokens, prompt, streaming, finalize)
        assert max_diff(flow.inference(tokens, *prompt, streaming=streaming, finalize=finalize), expected) < TOL

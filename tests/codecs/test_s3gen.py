"""S3Gen (streamvox.codecs.s3gen) against the official Chatterbox code, chatterbox-tts 0.1.7 (test-only:
`pip install --no-deps -c constraints.txt chatterbox-tts==0.1.7`; it also needs s3tokenizer, librosa, diffusers,
conformer, omegaconf, einops and scipy, which the CosyVoice2 references already bring).

The reference is built at tiny widths the way its own constructor builds it: `S3Token2Wav()` runs with the
classes it names (S3Tokenizer, CAMPPlus, UpsampleConformerEncoder, ConditionalDecoder, HiFTGenerator, ...) swapped
for the same classes with tiny width arguments (the encoder's hard-coded 512-channel pre-lookahead and upsampling
layers are rebuilt at the tiny width, and S3Tokenizer, which drops its config, gets the tiny ModelConfig as its
parent's default). It then loads write_tiny_s3gen's file with strict=True. Stubbed while importing: the package's
__init__ (it pulls in the TTS front end, the watermarker and gradio) and torchaudio, which has no build for torch
2.13: compliance.kaldi.fbank -> our kaldi_fbank and transforms.Resample -> our resample (both checked against
independent references in test_cosyvoice_frontend.py), so embed_ref's comparison covers the tokenizer, CAM++, the
mel and the cutting rules, not those two.

Randomness: the official flow draws x_0 with randn_like and HiFT its source noise from the global RNG; ours takes
explicit noise or a generator, so each comparison seeds the reference with s and ours with a generator seeded s.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from streamvox.codecs import cosyvoice_frontend as cvf
from streamvox.codecs.s3gen import (
    IGNORABLE_MISSING,
    LOOKAHEAD_TOKENS,
    S3GEN_PARAMS,
    SAMPLES_PER_TOKEN,
    TINY_S3GEN_PARAMS,
    NoiseTape,
    S3Gen,
    S3GenChunk,
    S3GenConditioning,
    write_tiny_s3gen,
)
from tests.stand_ins import refuse as _refuse
from tests.stand_ins import speechlike
from tests.stand_ins import stub_module as _stub

MEL_TOL = 1e-4
PCM_TOL = 1e-4
pytestmark = [pytest.mark.filterwarnings("ignore:`LoRACompatibleLinear` is deprecated:FutureWarning"),
              pytest.mark.usefixtures("one_thread")]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ the reference


def _stub_fbank(waveform, num_mel_bins=23, dither=0.0, sample_frequency=16000.0, **others):
    assert dither == 0.0 and not others, "CAM++ is expected to call fbank(wave, num_mel_bins) only"
    return cvf.kaldi_fbank(waveform, sample_rate=sample_frequency, num_mel_bins=num_mel_bins)


class _StubResample(torch.nn.Module):
    def __init__(self, orig_freq=16000, new_freq=16000, **others):
        super().__init__()
        self.orig_freq, self.new_freq = orig_freq, new_freq

    def forward(self, waveform):
        return cvf.resample(waveform, self.orig_freq, self.new_freq)


def _torchaudio_stubs() -> dict[str, types.ModuleType]:
    kaldi = _stub("torchaudio.compliance.kaldi", fbank=_stub_fbank)
    compliance = _stub("torchaudio.compliance", kaldi=kaldi)
    transforms = _stub("torchaudio.transforms", Resample=_StubResample)
    return {"torchaudio": _stub("torchaudio", compliance=compliance, transforms=transforms, load=_refuse),
            "torchaudio.compliance": compliance, "torchaudio.compliance.kaldi": kaldi,
            "torchaudio.transforms": transforms}


@pytest.fixture(scope="module")
def ref():
    """The official modules, as a namespace."""
    for name in ("chatterbox", "s3tokenizer", "librosa", "diffusers", "conformer", "omegaconf", "einops", "scipy"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"the reference needs {name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("diffusers.models.attention", "diffusers.models.lora"):  # before torchaudio is stubbed:
            importlib.import_module(name)  # transformers probes torchaudio's import spec, which a stub lacks
    if "chatterbox" not in sys.modules:  # skip the package __init__ (TTS front end, watermarker, gradio)
        spec = importlib.util.find_spec("chatterbox")
        package = _stub("chatterbox")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec  # so that later find_spec("chatterbox") calls still answer
        sys.modules["chatterbox"] = package
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("torchaudio") is None:
            for name, module in _torchaudio_stubs().items():
                mp.setitem(sys.modules, name, module)
        names = ("s3gen.s3gen", "s3gen.flow", "s3gen.xvector", "s3gen.hifigan", "s3gen.utils.mask",
                 "s3gen.transformer.upsample_encoder", "s3tokenizer.s3tokenizer")
        modules = {name.split(".")[-1]: importlib.import_module(f"chatterbox.models.{name}") for name in names}
    modules["model_v2"] = importlib.import_module("s3tokenizer.model_v2")
    return types.SimpleNamespace(**modules)


def _tiny_classes(ref, mp: pytest.MonkeyPatch) -> None:
    """Swap the classes S3Token2Wav's constructor names for the same classes at TINY_S3GEN_PARAMS' widths."""
    m, p = ref.s3gen, TINY_S3GEN_PARAMS
    enc, est = p["flow"]["encoder"], p["flow"]["decoder"]["estimator"]
    tok, spk, hift = p["tokenizer"], p["speaker_encoder"], p["hift"]
    encoder_class, upsample = m.UpsampleConformerEncoder, ref.upsample_encoder

    def tiny_encoder(**kwargs):
        size = enc["output_size"]
        widths = dict(output_size=size, input_size=size, attention_heads=enc["attention_heads"],
                      linear_units=enc["linear_units"], num_blocks=enc["num_blocks"])
        encoder = encoder_class(**{**kwargs, **widths})
        encoder.pre_lookahead_layer = upsample.PreLookaheadLayer(channels=size, pre_lookahead_len=LOOKAHEAD_TOKENS)
        encoder.up_layer = upsample.Upsample1D(channels=size, out_channels=size, stride=2)
        return encoder

    def widen(cls, **widths):
        return lambda *args, **kwargs: cls(*args, **{**kwargs, **widths})

    config = ref.model_v2.ModelConfig(n_mels=tok["n_mels"], n_audio_state=tok["n_state"], n_audio_head=tok["n_head"],
                                      n_audio_layer=tok["n_layer"])
    mp.setattr(ref.model_v2.S3TokenizerV2.__init__, "__defaults__", (config,))  # S3Tokenizer drops its config
    mp.setattr(m, "UpsampleConformerEncoder", tiny_encoder)
    mp.setattr(m, "ConditionalDecoder", widen(m.ConditionalDecoder, channels=est["channels"],
                                              attention_head_dim=est["attention_head_dim"], n_blocks=est["n_blocks"],
                                              num_mid_blocks=est["num_mid_blocks"], num_heads=est["num_heads"]))
    mp.setattr(m, "CausalMaskedDiffWithXvec", widen(m.CausalMaskedDiffWithXvec, input_size=enc["output_size"]))
    mp.setattr(m, "CAMPPlus", widen(m.CAMPPlus, growth_rate=spk["growth_rate"], bn_size=spk["bn_size"],
                                    init_channels=spk["init_channels"]))
    mp.setattr(m, "ConvRNNF0Predictor", widen(m.ConvRNNF0Predictor,
                                              cond_channels=hift["f0_predictor"]["cond_channels"]))
    mp.setattr(m, "HiFTGenerator", widen(m.HiFTGenerator, base_channels=hift["base_channels"]))


def build_reference(ref, tiny: bool):
    """The official S3Gen (S3Token2Wav) at TINY_S3GEN_PARAMS' widths, or at its own sizes (build it on meta)."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]), pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if tiny:
            _tiny_classes(ref, mp)
        model = ref.s3gen.S3Token2Wav()
    random.setstate(state[0])
    np.random.set_state(state[1])
    return model


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_s3gen(tmp_path_factory.mktemp("s3gen") / "s3gen.safetensors", seed=0)


@pytest.fixture(scope="module")
def tiny_state(tiny_path):
    from safetensors.torch import load_file

    return load_file(str(tiny_path))


@pytest.fixture(scope="module")
def reference(ref, tiny_state):
    model = build_reference(ref, tiny=True)
    model.load_state_dict(tiny_state, strict=True)  # every official key is in the tiny file, nothing else
    return model.eval()


@pytest.fixture(scope="module")
def s3gen(tiny_path):
    return S3Gen.from_safetensors(tiny_path, TINY_S3GEN_PARAMS)


def make_conditioning(prompt_tokens: int, odd_mel: bool = False, seed: int = 1) -> S3GenConditioning:
    g = seeded(seed)
    frames = 2 * prompt_tokens + int(odd_mel)
    return S3GenConditioning(torch.randint(0, 6561, (prompt_tokens,), generator=g),
                             torch.randn(frames, 80, generator=g) - 4, torch.randn(192, generator=g))


def ref_dict(cond: S3GenConditioning) -> dict:
    """The official embed_ref's dict for a conditioning (fresh each call: the official forward casts it in place)."""
    return {"prompt_token": cond.prompt_tokens[None].clone(), "prompt_feat": cond.prompt_mel[None].clone(),
            "prompt_token_len": torch.tensor([len(cond.prompt_tokens)]), "prompt_feat_len": None,
            "embedding": cond.speaker_embedding[None].clone()}


def make_tokens(num: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 6561, (num,), generator=seeded(seed))


# --------------------------------------------------------------------------------------------------- checkpoint


def test_full_size_layout_matches_official(ref):
    """At the real sizes (meta device): our file layout has the official state dict's key names and shapes."""
    with torch.device("meta"):
        theirs = build_reference(ref, tiny=False).state_dict()
        ours = S3Gen(S3GEN_PARAMS).publisher_state_dict()
    assert len(theirs) == 2490
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_tiny_file_is_the_official_layout(reference, tiny_state):
    expected = {k: (tuple(v.shape), v.dtype) for k, v in reference.state_dict().items()}
    assert {k: (tuple(v.shape), v.dtype) for k, v in tiny_state.items()} == expected
    assert tiny_state["speaker_encoder.head.bn1.num_batches_tracked"].dtype == torch.int64
    assert "mel2wav.conv_pre.parametrizations.weight.original0" in tiny_state
    assert torch.equal(tiny_state["tokenizer.window"], torch.hann_window(400))


def test_loading_is_strict(tiny_state):
    model = S3Gen(TINY_S3GEN_PARAMS)
    model.load_publisher_state({k: v for k, v in tiny_state.items() if k not in IGNORABLE_MISSING})  # tolerated
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_publisher_state({k: v for k, v in tiny_state.items() if k != "flow.encoder_proj.bias"})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_publisher_state({**tiny_state, "flow.extra": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("prompt_tokens,odd_mel", [(11, False), (9, True), (0, False)])
def test_flow_mel_parity(s3gen, reference, prompt_tokens, odd_mel):
    cond, tokens = make_conditioning(prompt_tokens, odd_mel), make_tokens(37)
    torch.manual_seed(5)
    expected = reference.flow_inference(tokens[None], ref_dict=ref_dict(cond), finalize=True)
    frames = 2 * (prompt_tokens + 37)
    noise = torch.randn(1, 80, frames, generator=seeded(5))[0]  # what the official randn_like drew
    got = s3gen.mel(tokens, cond, noise)
    assert got.shape == (80, frames - cond.prompt_mel.shape[0])
    assert max_diff(got[None], expected) < MEL_TOL


def test_non_final_flow_matches_official_modules(s3gen, reference):
    """finalize=False: the official flow.inference raises (its decoder mask keeps the dropped lookahead frames);
    the computation it means (encode every token, drop the last 3 tokens' frames, decode the rest) is ours."""
    cond, tokens = make_conditioning(11), make_tokens(40)
    with pytest.raises(RuntimeError):
        reference.flow_inference(tokens[None], ref_dict=ref_dict(cond), finalize=False)
    flow = reference.flow
    all_tokens = torch.cat([cond.prompt_tokens, tokens])[None]
    h, _ = flow.encoder(flow.input_embedding(all_tokens), torch.tensor([all_tokens.shape[1]]))
    mu = flow.encoder_proj(h[:, : -2 * LOOKAHEAD_TOKENS]).transpose(1, 2).contiguous()  # [1, 80, L]
    L, Tm = mu.shape[2], cond.prompt_mel.shape[0]
    cond_mel = torch.zeros(1, 80, L)
    cond_mel[:, :, :Tm] = cond.prompt_mel.T
    spks = flow.spk_embed_affine_layer(torch.nn.functional.normalize(cond.speaker_embedding[None], dim=1))
    torch.manual_seed(6)
    expected, _ = flow.decoder(mu=mu, mask=torch.ones(1, 1, L), spks=spks, cond=cond_mel, n_timesteps=10)
    got = s3gen.mel(tokens, cond, torch.randn(1, 80, L, generator=seeded(6))[0], finalize=False)
    assert max_diff(got[None], expected[:, :, Tm:]) < MEL_TOL


def test_hift_parity(s3gen, reference):
    mel = torch.randn(1, 80, 70, generator=seeded(1)) * 2 - 5
    torch.manual_seed(3)
    ref_pcm, ref_source = reference.hift_inference(mel)
    pcm, source = s3gen.mel2wav.inference(mel, None, [seeded(3)])
    assert max_diff(source, ref_source) <= PCM_TOL and max_diff(pcm, ref_pcm) <= PCM_TOL
    assert ref_pcm.abs().max() > 1e-2  # not a silent vocoder


@pytest.mark.parametrize("seconds", [3.37, 12.5])
def test_embed_ref_parity(s3gen, reference, seconds):
    """A 24 kHz clip, as the official prepare_conditionals hands it over: cut to 10 s (DEC_COND_LEN) first."""
    pcm = speechlike(seconds, 24000, seed=3)
    expected = reference.embed_ref(pcm[: 10 * 24000][None], 24000, device="cpu")
    got = s3gen.embed_ref(pcm, 24000)
    assert torch.equal(got.prompt_tokens, expected["prompt_token"][0])
    assert len(set(got.prompt_tokens.tolist())) > 20  # the tiny tokenizer is not degenerate
    assert got.prompt_mel.shape == expected["prompt_feat"][0].shape
    assert max_diff(got.prompt_mel, expected["prompt_feat"][0]) < 1e-5  # measured 4.8e-7
    assert max_diff(got.speaker_embedding, expected["embedding"][0]) < 1e-5
    assert got.prompt_mel.shape[0] == min(int(seconds * 24000), 240000) // 480


def test_embed_ref_resamples_other_rates(s3gen):
    pcm = speechlike(4.0, 24000, seed=4)
    at_48k = cvf.resample(pcm, 24000, 48000)
    a, b = s3gen.embed_ref(pcm, 24000), s3gen.embed_ref(at_48k.numpy(), 48000)
    assert a.prompt_mel.shape == b.prompt_mel.shape and (a.prompt_mel - b.prompt_mel).abs().max() < 0.05
    with pytest.raises(ValueError, match="silent"):
        s3gen.embed_ref(torch.zeros(48000), 24000)
    with pytest.raises(ValueError, match="at least"):
        s3gen.embed_ref(pcm[:2400], 24000)
    with pytest.raises(ValueError, match="mono"):
        s3gen.embed_ref(torch.stack([pcm, pcm]), 24000)


@pytest.mark.parametrize("num_tokens", [40, 13])
def test_inference_parity(s3gen, reference, num_tokens):
    """The official inference (flow, HiFT, fade-in) on the official embed_ref's conditioning."""
    pcm = speechlike(2.5, 24000, seed=5)
    cond = s3gen.embed_ref(pcm, 24000)
    tokens = make_tokens(num_tokens, seed=7)
    torch.manual_seed(11)
    expected, _ = reference.inference(tokens[None], ref_dict=reference.embed_ref(pcm[None], 24000, device="cpu"))
    got, _ = s3gen.inference(tokens, cond, generator=seeded(11))
    frames = 2 * (cond.prompt_tokens.shape[0] + num_tokens) - cond.prompt_mel.shape[0]  # 2.5 s: an odd mel
    assert got.shape == expected.shape == (1, 480 * frames) and frames == 2 * num_tokens - 1
    assert max_diff(got, expected) < PCM_TOL
    assert got[0, :480].abs().max() == 0 and got[0, 960:].abs().max() > 1e-2  # silenced, then faded in
    torch.manual_seed(11)
    global_rng, _ = s3gen.inference(tokens, cond)
    assert torch.equal(global_rng, got)


# ---------------------------------------------------------------------------------------------------- streams


def test_noise_tape_does_not_depend_on_chunking():
    whole, pieces = NoiseTape(seeded(4)), NoiseTape(seeded(4))
    for frames in (7, 56, 57, 130):
        pieces.take(frames)
    assert torch.equal(whole.take(130), pieces.take(130))


def test_single_chunk_stream_is_the_whole_decode(s3gen):
    cond, tokens = make_conditioning(11), make_tokens(30)
    stream = s3gen.new_stream(cond, seed=3)
    pcm = s3gen.decode_chunk(stream, tokens, 0, 30, True)
    noise = s3gen.new_stream(cond, seed=3).noise.take(2 * (11 + 30))
    whole, _ = s3gen.mel2wav.inference(s3gen.mel(tokens, cond, noise)[None], None, [seeded(4)])
    whole = whole[0].clone()
    whole[:960] *= s3gen.trim_fade
    assert torch.equal(pcm, whole)


def chunk_schedule(num_tokens: int, first: int, hop: int) -> list[tuple[int, int, bool]]:
    """(start, end, is_last) of each chunk: `first` tokens, then `hop`, each once its lookahead exists."""
    plan, start = [], 0
    while True:
        end = start + (first if start == 0 else hop)
        if end + LOOKAHEAD_TOKENS >= num_tokens:
            return [*plan, (start, num_tokens, True)]
        plan.append((start, end, False))
        start = end


def test_chunked_mel_against_whole(s3gen):
    """The flow attends everywhere, so a chunk's frames miss the tokens past its lookahead: the chunked mel drifts
    from the whole-utterance mel (same noise). Tiny random weights, 100 tokens after an 11-token prompt; relative
    RMS (of the mel's std) measured 0.132 for chunks of 25 tokens, 0.124 for 25 then 50, 0.072 for 50 (spread
    over all frames, not only near chunk ends: random attention is diffuse). The trained model may differ."""
    cond, tokens = make_conditioning(11), make_tokens(100)
    noise = NoiseTape(seeded(0)).take(2 * (11 + 100))
    whole = s3gen.mel(tokens, cond, noise)
    errors = {}
    for first, hop in ((25, 25), (25, 50), (50, 50)):
        parts = [s3gen.mel(tokens[:end if last else end + LOOKAHEAD_TOKENS], cond, noise, finalize=last)[:, 2 * start:]
                 for start, end, last in chunk_schedule(100, first, hop)]
        chunked = torch.cat(parts, dim=1)
        assert chunked.shape == whole.shape
        errors[first, hop] = ((chunked - whole).pow(2).mean().sqrt() / whole.std()).item()
    print("chunked mel, RMS error / std:", errors)
    assert 0.03 < errors[50, 50] < errors[25, 50] < errors[25, 25] < 0.3


def test_chunked_stream_against_whole(s3gen):
    """The whole pipeline in chunks of 25 then 50 tokens against one final chunk (same seed): the PCM differs by
    the mel drift above plus the vocoder's per-call randomness (measured 0.19 of the PCM norm; another vocoder seed
    on the same mel alone moves it by about as much)."""
    cond, tokens = make_conditioning(11), make_tokens(100)
    pcms = []
    for first, hop in ((100, 100), (25, 50)):
        stream = s3gen.new_stream(cond, seed=0)
        pcms.append(torch.cat([s3gen.decode_chunk(stream, tokens if last else tokens[:end + LOOKAHEAD_TOKENS], start,
                                                  end, last) for start, end, last in chunk_schedule(100, first, hop)]))
    whole, chunked = pcms
    assert chunked.shape == whole.shape == (100 * SAMPLES_PER_TOKEN,)
    assert torch.equal(chunked[:480], torch.zeros(480))  # the fade-in, once per stream
    error = ((chunked - whole).norm() / whole.norm()).item()
    print("chunked PCM, relative error:", error)
    assert 0 < error < 0.5


def test_batched_chunks_equal_single(s3gen):
    conds = [make_conditioning(11, seed=1), make_conditioning(6, odd_mel=True, seed=2)]
    token_sets = [make_tokens(40, seed=3), make_tokens(33, seed=4)]
    plans = [(0, 25, False), (25, 40, True)], [(0, 20, False), (20, 33, True)]
    singles = [[], []]
    for b in range(2):
        stream = s3gen.new_stream(conds[b], seed=b)
        for start, end, last in plans[b]:
            singles[b].append(s3gen.decode_chunk(stream, token_sets[b], start, end, last))
    streams = [s3gen.new_stream(conds[b], seed=b) for b in range(2)]
    for step in range(2):
        chunks = [S3GenChunk(streams[b], token_sets[b], *plans[b][step]) for b in range(2)]
        for b, pcm in enumerate(s3gen.decode_chunks(chunks)):
            assert max_diff(pcm, singles[b][step]) < PCM_TOL


def test_chunks_are_checked(s3gen):
    cond, tokens = make_conditioning(5), make_tokens(40)
    stream = s3gen.new_stream(cond)
    with pytest.raises(ValueError, match="needs tokens up to 28"):
        s3gen.decode_chunk(stream, tokens[:26], 0, 25, False)  # no lookahead yet
    with pytest.raises(ValueError, match="in order"):
        s3gen.decode_chunk(stream, tokens, 10, 25, False)
    with pytest.raises(ValueError, match="last chunk must end"):
        s3gen.decode_chunk(stream, tokens, 0, 30, True)
    assert s3gen.decode_chunk(stream, tokens, 0, 25, False).shape == (25 * SAMPLES_PER_TOKEN - 8 * 480,)

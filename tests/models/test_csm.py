"""CSM against transformers' CsmForConditionalGeneration and its Mimi, on the tiny `make-tiny csm` checkpoint."""

import json

import numpy as np
import pytest
import torch

from streamvox.batch import NewRequest, ScheduledRow, StepBatch
from streamvox.config import SamplingParams
from streamvox.models.csm import Segment
from streamvox.models.tiny.csm import write_tiny
from streamvox.runner.weights import load_model

transformers = pytest.importorskip("transformers")

TEXT = "Parity check: the same numbers, please."


@pytest.fixture(scope="module")
def csm_dir(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny-csm"), seed=0)


@pytest.fixture(scope="module")
def csm_model(csm_dir):
    return load_model(str(csm_dir))


@pytest.fixture(scope="module")
def reference(csm_dir):
    model, info = transformers.CsmForConditionalGeneration.from_pretrained(csm_dir, output_loading_info=True)
    assert not any(info.values()), info  # every tensor present, named and shaped as transformers expects
    assert all(p.device.type == "cpu" for p in model.parameters())  # tied embeddings really loaded
    return model.eval()


@pytest.fixture
def make_engine(csm_model, engine_for):
    return lambda **options: engine_for(csm_model, num_blocks=256, **options)


def greedy(num_frames, seed=0):
    return SamplingParams(temperature=0.0, max_tokens=num_frames, seed=seed, ignore_eos=True)


def _relative(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def test_make_tiny_is_deterministic_and_detected_as_csm(tmp_path, csm_dir, csm_model):
    again = write_tiny(tmp_path / "again", seed=0)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (again / name).read_bytes() == (csm_dir / name).read_bytes(), name
    config = json.loads((csm_dir / "config.json").read_text())
    assert config["architectures"] == ["CsmForConditionalGeneration"] and config["num_codebooks"] == 32
    assert csm_model.family == "csm" and csm_model.timing.frame_rate_hz == 12.5


def _our_logits(engine, prompt, frame=None):
    """Our backbone's logits at the prompt's last position (prefill), then, with `frame` fed, at the next."""
    runner, pool = engine.lm_runner, engine.pool
    blocks = tuple(pool.allocate(pool.blocks_for(len(prompt) + 2)))
    runner.execute(StepBatch((NewRequest("p", tuple(prompt), greedy(4), 0),), (), ()))

    def last_logits(row):
        return runner.logits(row)[-1]

    with torch.inference_mode():
        prefill = last_logits(ScheduledRow("p", 0, len(prompt), blocks, True))
        runner.requests["p"].inputs.append(engine.model.next_input(frame))
        decode = last_logits(ScheduledRow("p", len(prompt), 1, blocks, True))
    return prefill, decode


def _reference_embeds(reference, prompt):
    """transformers' own embedding of our prompt rows: text ids through its text table, frames through its summed
    codebook embeddings (what its processor does for <|AUDIO|> and <|audio_eos|> placeholders)."""
    rows = torch.tensor(prompt)
    embeds = []
    for row in rows:
        if row[-1] >= 0:
            embeds.append(reference.embed_text_tokens(row[-1:])[0])
        else:
            embeds.append(reference.backbone_model.embed_tokens(row[None, None, :-1])[0, 0])
    return torch.stack(embeds)[None]


@pytest.mark.parametrize("with_context", [False, True])
def test_backbone_logits_match_transformers(csm_model, reference, make_engine, with_context):
    codes = torch.randint(0, 64, (5, 32), generator=torch.Generator().manual_seed(3))
    context = [Segment("0", "Hi there.", codes), Segment("1", "Hello.")] if with_context else []
    prompt = csm_model.prepare_conversation(context, TEXT, "1")
    frame = tuple(range(32))
    prefill, decode = _our_logits(make_engine(), prompt, frame)
    with torch.no_grad():
        if with_context:
            embeds = _reference_embeds(reference, prompt)
            step = reference.backbone_model.embed_tokens(torch.tensor(frame)[None, None])
            ref_prefill = reference(inputs_embeds=embeds).logits[0, -1]
            ref_decode = reference(inputs_embeds=torch.cat([embeds, step], dim=1)).logits[0, -1]
        else:
            ids = torch.tensor([[row[-1] for row in prompt]])
            assert ids[0, 0] == 512 and ids[0, -1] == 513  # <|begin_of_text|> ... <|end_of_text|>
            ref_prefill = reference(input_ids=ids).logits[0, -1]
            out = reference(input_ids=ids, use_cache=True)
            ref_decode = reference(input_ids=torch.tensor(frame)[None, None], past_key_values=out.past_key_values,
                                   use_cache=True).logits[0, -1]
    assert prefill.shape == ref_prefill.shape == (67,)
    for ours, ref in ((prefill, ref_prefill), (decode, ref_decode)):
        assert ref.std() > 0.3 and _relative(ours[:64], ref[:64]) <= 1e-4
        assert torch.isinf(ours[64:]).all()  # the heads' special ids are never drawn: the codec has 64 codes
    if with_context:  # 5 frames and the audio end frame sit between the two text turns
        assert sum(1 for row in prompt if row[-1] < 0) == 6


def test_greedy_frames_and_streamed_audio_match_transformers(csm_model, reference, make_engine):
    num_frames = 10
    engine = make_engine()
    chunks = list(engine.stream(engine.submit(TEXT, "0", greedy(num_frames))))
    assert len(chunks) >= 3  # the audio really came in several chunks, each continuing the Mimi state
    ours = engine.result(engine.submit(TEXT, "0", greedy(num_frames)))
    ids = torch.tensor([[row[-1] for row in csm_model.prepare(TEXT, "0")]])
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, do_sample=False, depth_decoder_do_sample=False,
                                      max_new_tokens=num_frames)[0]  # [frames, 32]
        expected_pcm = reference.codec_model.decode(expected.T[None]).audio_values[0, 0].numpy()
    assert expected.shape == (num_frames, 32)
    assert torch.equal(torch.tensor(ours.step_tokens), expected)  # codebook 0 from the backbone, 1..31 from depth
    streamed = np.concatenate([c.pcm for c in chunks])
    assert streamed.shape == expected_pcm.shape == (num_frames * 1920,)
    error = np.linalg.norm(streamed - expected_pcm) / np.linalg.norm(expected_pcm)
    assert expected_pcm.std() > 1e-3 and error < 1e-4


def test_batching_is_invisible(make_engine, csm_model):
    """Requests batched, joining midway and prefilled in chunks make the codes and audio they make alone."""
    texts = ["Hi.", "A somewhat longer sentence to make the prompt grow.", "Okay!", "Numbers: one, two, three."]
    samplings = [greedy(6 + 2 * i, seed=i) if i % 2 else csm_model.default_sampling.replace(max_tokens=8, seed=i)
                 for i in range(4)]
    engine = make_engine(max_num_batched_tokens=24)
    ids = [engine.submit(texts[i], str(i % 2), samplings[i]) for i in range(2)]
    for _ in range(3):
        engine.step()
    ids += [engine.submit(texts[i], str(i % 2), samplings[i]) for i in range(2, 4)]
    batched = [engine.result(i) for i in ids]
    for i, result in enumerate(batched):
        alone_engine = make_engine()
        alone = alone_engine.result(alone_engine.submit(texts[i], str(i % 2), samplings[i]))
        assert result.step_tokens == alone.step_tokens and len(result.step_tokens) == samplings[i].max_tokens
        assert result.pcm.shape == alone.pcm.shape == (len(result.step_tokens) * 1920,)
        assert np.abs(result.pcm - alone.pcm).max() <= 1e-5


def test_sampling_follows_the_seed(make_engine, csm_model):
    sampling = csm_model.default_sampling.replace(max_tokens=4, seed=7)
    engine = make_engine()
    first, again, other = (engine.result(engine.submit("seeded", None, s))
                           for s in (sampling, sampling, sampling.replace(seed=8)))
    assert first.step_tokens == again.step_tokens != other.step_tokens
    assert all(max(frame) < 64 for frame in first.step_tokens)  # never an id the codec cannot decode


def test_the_end_of_speech_frame_stops_and_is_not_voiced(csm_model):
    eos = (0,) * 31 + (5,)
    assert csm_model.is_stop(eos) and not csm_model.is_stop((0,) * 30 + (1, 0))
    builder = csm_model.new_frame_builder()
    assert builder.push(tuple(range(32))) == tuple(range(32)) and builder.push(eos) is None


def test_bad_context_codes_are_refused(csm_model):
    with pytest.raises(ValueError, match=r"\[frames, 32\]"):
        csm_model.prepare_conversation([Segment("0", "hi", torch.zeros(3, 8, dtype=torch.long))], "text", None)
    with pytest.raises(ValueError, match="unknown voice"):
        csm_model.prepare("text", "7")


def test_reference_audio_is_encoded_and_placed_as_transformers_places_it(csm_model, reference, make_engine):
    """A voice clip with its transcript becomes a context turn of the same speaker: our prompt's logits equal
    transformers' own audio path (its Mimi encoder, <|AUDIO|> and <|audio_eos|> placeholders)."""
    from streamvox.models.base import Reference

    clip = torch.randn(30000, generator=torch.Generator().manual_seed(5)) * 0.3
    prompt = csm_model.prepare_request(TEXT, "1", Reference("What the clip says.", clip)).prompt
    frames = -(-30000 // 1920)
    assert sum(1 for row in prompt if row[-1] < 0) == frames + 1  # the clip's frames and the audio end frame
    tokenizer, config = csm_model.tokenizer, reference.config

    def turn(text):
        return [512, *tokenizer.encode(f"[1]{text}", add_special_tokens=False).ids, 513]

    ids = turn("What the clip says.") + [config.audio_token_id] * frames + [config.audio_eos_token_id] + turn(TEXT)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids]), input_values=clip[None, None],
                             input_values_cutoffs=torch.tensor([[30000]])).logits[0, -1]
    ours, _ = _our_logits(make_engine(), prompt, tuple(range(32)))
    assert _relative(ours[:64], expected[:64]) <= 1e-4
    with pytest.raises(ValueError, match="transcript"):
        csm_model.prepare_request(TEXT, "1", Reference("  ", clip))

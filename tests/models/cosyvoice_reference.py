"""The publisher's CosyVoice2 (cosyvoice-minicpmo 0.1.0, test-only, installed --no-deps) for the parity tests in
test_cosyvoice2.py: imported, loaded from a checkpoint directory its own way (hyperpyyaml, then strict state-dict
loads as cosyvoice/cli/model.py does), and driven as `Qwen2LM.inference` and `CosyVoice2Model.tts(stream=True)`
drive it.

Stand-ins, put in sys.modules only while the reference modules are imported (the modules keep them; nothing is
left in sys.modules for later importers, and a module another test file already put there is left as it is):
- ``torchaudio`` (no build for torch 2.13): cosyvoice.utils.file_utils imports it; nothing here calls into it.
- ``whisper.tokenizer`` and ``tiktoken``: cosyvoice.tokenizer.tokenizer imports them for CosyVoice1's tokenizer;
  CosyVoice2's (QwenTokenizer) is transformers' AutoTokenizer.
- ``matcha.utils`` / ``matcha.utils.pylogger``: the package's __init__ imports hydra and lightning; the CFM base
  class only needs get_pylogger.
transformers is imported first: it probes torchaudio with importlib.util.find_spec, which a stand-in breaks.

The publisher's UpsampleConformerEncoder hard-codes 512 channels for its pre-lookahead and upsampling layers (the
real model's width); the tiny encoder is 64 wide, so after hyperpyyaml builds the flow those two layers are
rebuilt, from the same classes, at the yaml's `output_size` (as tests/codecs/test_cosyvoice_flow.py does). The
state-dict keys that did not fit before are kept so a test can show they are exactly those layers.

Requires: cosyvoice-minicpmo==0.1.0, hyperpyyaml and ruamel.yaml<0.19 (0.19 dropped what hyperpyyaml 1.2.3's
loader relies on: 'Loader' object has no attribute 'max_depth'), all installed --no-deps.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import logging
import math
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.stand_ins import refuse as _refuse
from tests.stand_ins import speechlike  # noqa: F401 - the tests take it from here
from tests.stand_ins import stub_module as _stub

REFERENCE_MODULES = (
    "cosyvoice.llm.llm", "cosyvoice.flow.flow", "cosyvoice.flow.flow_matching", "cosyvoice.flow.decoder",
    "cosyvoice.transformer.upsample_encoder", "cosyvoice.hifigan.generator", "cosyvoice.hifigan.f0_predictor",
    "cosyvoice.utils.common", "cosyvoice.cli.model", "cosyvoice.tokenizer.tokenizer", "omegaconf",
)


class _Unavailable:
    def __init__(self, *args, **kwargs):
        _refuse()


def import_reference() -> types.SimpleNamespace:
    """The reference modules (skips the calling test when a package is missing)."""
    for name in ("cosyvoice", "hyperpyyaml", "matcha", "omegaconf", "diffusers", "conformer", "einops"):
        pytest.importorskip(name)
    import hyperpyyaml
    import transformers  # noqa: F401  (before the torchaudio stand-in: it find_spec's torchaudio on import)
    from transformers import AutoTokenizer, Qwen2ForCausalLM  # noqa: F401  (its lazy modules, now)

    stubs = {"matcha.utils": _stub("matcha.utils", __path__=[]),
             "matcha.utils.pylogger": _stub("matcha.utils.pylogger", get_pylogger=logging.getLogger)}
    for name, stub in (("torchaudio", _stub("torchaudio", load=_refuse)),
                       ("tiktoken", _stub("tiktoken", get_encoding=_refuse)),
                       ("whisper", _stub("whisper", __path__=[]))):
        if importlib.util.find_spec(name) is None:
            stubs[name] = stub
    if "whisper" in stubs:
        stubs["whisper.tokenizer"] = _stub("whisper.tokenizer", Tokenizer=_Unavailable)
    root = logging.getLogger()
    root_state = root.level, list(root.handlers)  # cosyvoice.utils.file_utils calls logging.basicConfig(DEBUG)
    with pytest.MonkeyPatch.context() as mp:
        for name, stub in stubs.items():
            if name not in sys.modules:
                mp.setitem(sys.modules, name, stub)
        modules = {name: importlib.import_module(name) for name in REFERENCE_MODULES}
    root.setLevel(root_state[0])
    root.handlers[:] = root_state[1]
    return types.SimpleNamespace(hyperpyyaml=hyperpyyaml, llm=modules["cosyvoice.llm.llm"],
                                 model=modules["cosyvoice.cli.model"],
                                 tokenizer=modules["cosyvoice.tokenizer.tokenizer"],
                                 upsample_encoder=modules["cosyvoice.transformer.upsample_encoder"],
                                 common=modules["cosyvoice.utils.common"])


@contextlib.contextmanager
def official_frontend_module(fbank=_refuse, resample=None, log_mel_spectrogram=_refuse):
    """cosyvoice.cli.frontend (the publisher's CosyVoiceFrontEnd), imported over stand-ins for what it imports
    but cannot have here: torchaudio's kaldi fbank and Resample (`resample(waveform, orig, new)`; None: the
    waveform as it is), whisper's log-mel and inflect (unused by the code under test). The module is yielded
    and dropped from sys.modules afterwards, so nothing stays bound to the stand-ins."""
    if importlib.util.find_spec("cosyvoice") is None:
        pytest.skip("cosyvoice-minicpmo is not installed")

    class Resample:
        def __init__(self, orig_freq=16000, new_freq=16000, **others):
            self.orig_freq, self.new_freq = orig_freq, new_freq

        def __call__(self, waveform):
            return waveform if resample is None else resample(waveform, self.orig_freq, self.new_freq)

    kaldi = _stub("torchaudio.compliance.kaldi", fbank=fbank)
    compliance = _stub("torchaudio.compliance", kaldi=kaldi)
    transforms = _stub("torchaudio.transforms", Resample=Resample)
    stubs = {
        "torchaudio": _stub("torchaudio", compliance=compliance, transforms=transforms, load=_refuse),
        "torchaudio.compliance": compliance, "torchaudio.compliance.kaldi": kaldi, "torchaudio.transforms": transforms,
        "whisper": _stub("whisper", log_mel_spectrogram=log_mel_spectrogram),
    }
    if importlib.util.find_spec("inflect") is None:
        stubs["inflect"] = _stub("inflect", engine=_refuse)
    owned = ("cosyvoice.cli.frontend", "cosyvoice.utils.file_utils")
    with pytest.MonkeyPatch.context() as mp:
        for name, module in stubs.items():
            mp.setitem(sys.modules, name, module)
        for name in owned:
            mp.delitem(sys.modules, name, raising=False)
        try:
            yield importlib.import_module("cosyvoice.cli.frontend")
        finally:
            for name in owned:
                sys.modules.pop(name, None)


def frontend_model_input(frontend_module, tokenizer, features, mode: str, text: str, prompt_text: str = "",
                         instruct_text: str = "") -> dict:
    """What the publisher's frontend hands its model for `mode` ("zero_shot", "cross_lingual" or "instruct2")
    with a clip whose features (prompt tokens, prompt mel, speaker embedding) are `features`: its own
    frontend_* methods run, with the real text tokenizer; only the clip's three feature extractors give
    `features` (their parity with the publisher's extractors is tests/codecs/test_cosyvoice_frontend.py's)."""
    cls = frontend_module.CosyVoiceFrontEnd
    count = torch.tensor([features.prompt_tokens.numel()], dtype=torch.int32)
    front = types.SimpleNamespace(
        tokenizer=tokenizer, allowed_special="all", device="cpu",
        _extract_speech_token=lambda speech: (features.prompt_tokens[None].to(torch.int32), count),
        _extract_speech_feat=lambda speech: (features.prompt_mel[None], 2 * count),
        _extract_spk_embedding=lambda speech: features.speaker_embedding[None])
    for name in ("_extract_text_token", "frontend_zero_shot"):
        setattr(front, name, getattr(cls, name).__get__(front))
    clip = torch.zeros(1, 16000)  # read only by the stood-in extractors
    if mode == "zero_shot":
        return cls.frontend_zero_shot(front, text, prompt_text, clip, 24000, "")
    if mode == "cross_lingual":
        return cls.frontend_cross_lingual(front, text, clip, 24000, "")
    return cls.frontend_instruct2(front, text, instruct_text, clip, 24000, "")


def load_reference(ref: types.SimpleNamespace, path: Path) -> types.SimpleNamespace:
    """cosyvoice2.yaml through hyperpyyaml (the Qwen2 path overridden, as CosyVoice2.__init__ does), then llm.pt,
    flow.pt and hift.pt loaded strictly (cosyvoice/cli/model.py `load`), all in eval mode."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]), open(path / "cosyvoice2.yaml") as f:  # the CFM seeds every RNG
        config = ref.hyperpyyaml.load_hyperpyyaml(f, overrides={"qwen_pretrain_path": str(path / "CosyVoice-BlankEN")})
    random.setstate(state[0])
    np.random.set_state(state[1])
    llm, flow, hift = config["llm"], config["flow"], config["hift"]
    llm.load_state_dict(torch.load(path / "llm.pt", map_location="cpu", weights_only=True), strict=True)
    flow_state = torch.load(path / "flow.pt", map_location="cpu", weights_only=True)
    built = flow.state_dict()
    misfits = sorted(k for k, v in flow_state.items() if k in built and built[k].shape != v.shape)
    width = flow.encoder._output_size
    if flow.encoder.pre_lookahead_layer.conv1.out_channels != width:  # the hard-coded 512 (see the module doc)
        lookahead = flow.encoder.pre_lookahead_layer.pre_lookahead_len
        flow.encoder.pre_lookahead_layer = ref.upsample_encoder.PreLookaheadLayer(width, lookahead)
        flow.encoder.up_layer = ref.upsample_encoder.Upsample1D(width, width, stride=flow.encoder.up_layer.stride)
    flow.load_state_dict(flow_state, strict=True)
    hift_state = torch.load(path / "hift.pt", map_location="cpu", weights_only=True)
    hift.load_state_dict({k.replace("generator.", ""): v for k, v in hift_state.items()}, strict=True)
    model = ref.model.CosyVoice2Model(llm.eval(), flow.eval(), hift.eval())
    tokenizer = ref.tokenizer.get_qwen_tokenizer(str(path / "CosyVoice-BlankEN"), skip_special_tokens=True)
    return types.SimpleNamespace(config=config, llm=llm, flow=flow, hift=hift, model=model, tokenizer=tokenizer,
                                 flow_misfits=misfits)


def _argmax(weighted_scores: torch.Tensor, decoded_tokens: list, sampling: int) -> torch.Tensor:
    """ras_sampling's interface, greedy: the highest-scoring id of all speech_token_size + 3."""
    return weighted_scores.argmax(dim=0, keepdim=True)


def greedy_inference(llm, text_ids: list[int], prompt_text_ids: list[int], prompt_speech_tokens: torch.Tensor,
                     num_steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Qwen2LM.inference with its sampling replaced by argmax, min_len 0 and a max_len past `num_steps`:
    (speech tokens it yields, at most num_steps; fewer when it draws the end), and the llm_decoder scores
    [speech_token_size + 3] of each step it took (the prefill's last position first)."""
    scores = []
    hook = llm.llm_decoder.register_forward_hook(lambda module, args, out: scores.append(out[0].detach().clone()))
    sampling, llm.sampling = llm.sampling, _argmax
    try:
        generator = llm.inference(
            text=torch.tensor([text_ids], dtype=torch.int32), text_len=torch.tensor([len(text_ids)], dtype=torch.int32),
            prompt_text=torch.tensor([prompt_text_ids], dtype=torch.int32).reshape(1, -1),
            prompt_text_len=torch.tensor([len(prompt_text_ids)], dtype=torch.int32),
            prompt_speech_token=prompt_speech_tokens.reshape(1, -1).to(torch.int32),
            prompt_speech_token_len=torch.tensor([prompt_speech_tokens.numel()], dtype=torch.int32),
            embedding=torch.zeros(0, 192), sampling=25,
            max_token_text_ratio=math.ceil((num_steps + 1) / len(text_ids)) + 1, min_token_text_ratio=0)
        tokens = list(itertools.islice(generator, num_steps))
        generator.close()
    finally:
        llm.sampling = sampling
        hook.remove()
    return tokens, scores


def stream_schedule(num_tokens: int, num_prompt_tokens: int, hop: int = 25, lookahead: int = 3):
    """The chunks CosyVoice2Model.tts(stream=True) decodes once all `num_tokens` exist: [(start, end, finalize)];
    a non-final chunk runs the flow over tokens [0, end + lookahead)."""
    chunks, offset = [], 0
    pad = math.ceil(num_prompt_tokens / hop) * hop - num_prompt_tokens
    while True:
        this_hop = hop + pad if offset == 0 else hop
        if num_tokens - offset < this_hop + lookahead:
            return [*chunks, (offset, num_tokens, True)]
        chunks.append((offset, offset + this_hop, False))
        offset += this_hop


def stream_token2wav(model, tokens: list[int], prompt_tokens: torch.Tensor, prompt_mel: torch.Tensor,
                     embedding: torch.Tensor, seed: int) -> list[tuple[int, int, torch.Tensor]]:
    """CosyVoice2Model.tts(stream=True)'s token2wav loop over `tokens` (all known up front), the global RNG
    seeded with `seed` first: [(start token, end token, pcm [n])] per chunk. prompt_tokens [Tp], prompt_mel
    [2 Tp, 80], embedding [192]."""
    uuid = "parity"
    model.hift_cache_dict[uuid] = None
    hop, lookahead = model.token_hop_len, model.flow.pre_lookahead_len
    assert (hop, lookahead) == (25, 3)
    prompt_token, prompt_feat = prompt_tokens.reshape(1, -1).to(torch.int32), prompt_mel.reshape(1, -1, 80)
    embedding = embedding.reshape(1, -1)
    pad = int(np.ceil(prompt_token.shape[1] / hop) * hop - prompt_token.shape[1])
    chunks, offset = [], 0
    torch.manual_seed(seed)
    try:
        while True:  # tts' loop once the LM has ended (llm_end_dict True)
            this_hop = hop + pad if offset == 0 else hop
            if len(tokens) - offset < this_hop + lookahead:
                break
            these = torch.tensor(tokens[: offset + this_hop + lookahead]).unsqueeze(dim=0)
            speech = model.token2wav(token=these, prompt_token=prompt_token, prompt_feat=prompt_feat,
                                     embedding=embedding, token_offset=offset, uuid=uuid, stream=True,
                                     finalize=False)
            chunks.append((offset, offset + this_hop, speech[0]))
            offset += this_hop
        speech = model.token2wav(token=torch.tensor(tokens).unsqueeze(dim=0), prompt_token=prompt_token,
                                 prompt_feat=prompt_feat, embedding=embedding, token_offset=offset, uuid=uuid,
                                 finalize=True)
        chunks.append((offset, len(tokens), speech[0]))
    finally:
        model.hift_cache_dict.pop(uuid)
    return chunks

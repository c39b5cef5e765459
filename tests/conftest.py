"""Shared fixtures: one tiny random-weight Orpheus checkpoint per test session, written to disk."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through its interpreter; set before any
    os.environ.setdefault("TRITON_INTERPRET", "1")  # kernel is defined (they are compiled or interpreted then)

from streamvox.config import CacheConfig, EngineConfig, SchedulerConfig
from streamvox.engine.local import Engine
from streamvox.models.tiny.orpheus import write_tiny
from streamvox.runner.weights import load_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny-orpheus"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return load_model(str(tiny_dir))


@pytest.fixture
def engine_for():
    """engine_for(model, ...) -> an in-process Engine (fcfs unless told), closed when the test ends."""
    engines = []

    def make(model, num_blocks=512, block_size=16, max_num_seqs=64, max_num_batched_tokens=512, policy="fcfs",
             max_queue_len=1000):
        config = EngineConfig(
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
            scheduler=SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs, max_queue_len=max_queue_len,
                                      max_num_batched_tokens=max_num_batched_tokens),
        )
        engines.append(Engine(model, config))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny modules: they gain nothing from threads, and threads that spin on a
    shared 2-core machine slow them down about 10x. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def make_engine(tiny_model, engine_for):
    return lambda **options: engine_for(tiny_model, **options)




@pytest.fixture(scope="session")
def qwen_tts():
    """The qwen-tts reference package (test-only, installed without its dependencies).

    Its package __init__ imports the 25 Hz tokenizer, whose speech_vq module needs torchaudio, sox and
    onnxruntime; torchaudio has no build for torch 2.13. The 12 Hz models this project is checked against never
    use that module, so it is replaced by one whose classes refuse to be built."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("qwen_tts") is None:
        pytest.skip("qwen-tts is not installed (make test installs it)")
    name = "qwen_tts.core.tokenizer_25hz.vq.speech_vq"
    if name not in sys.modules:
        stand_in = types.ModuleType(name)

        class Unavailable:
            def __init__(self, *args, **kwargs):
                raise RuntimeError("the 25 Hz tokenizer needs torchaudio, which has no build for this torch")

        stand_in.WhisperEncoderVQ = stand_in.XVectorExtractor = Unavailable
        sys.modules[name] = stand_in
    import qwen_tts

    return qwen_tts

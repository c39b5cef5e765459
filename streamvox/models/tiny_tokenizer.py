"""A small byte-level BPE tokenizer.json, trained deterministically, for tiny random-weight checkpoints.

It has the shape of a Llama-3 tokenizer: byte-level BPE, a block of reserved special tokens after the text
vocabulary, and a post-processor that puts <|begin_of_text|> in front of every encoded text.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

_CORPUS = """
The quick brown fox jumps over the lazy dog while the radio plays a song about the sea.
Streaming speech needs the first sound quickly, and every later piece before the listener runs out.
Hello there! How are you today? I am fine, thank you, and I hope the weather stays warm and bright.
Numbers like one, two, three, four, five, six, seven, eight, nine and ten are spoken every day.
She sells sea shells by the sea shore; the shells she sells are surely from the shore.
A voice agent listens, thinks, and answers; it should never stutter, stall or talk over the user.
Please read this sentence slowly, with a calm voice, and pause briefly at every comma and period.
""".strip().splitlines()


def build_tiny_tokenizer(text_vocab_size: int, num_reserved: int, added_tokens: list[str]) -> Tokenizer:
    """BPE with `text_vocab_size` entries, then `num_reserved` special tokens, then `added_tokens`.

    Reserved token r is `<|reserved_special_token_r|>`, except r=0 `<|begin_of_text|>`, r=1 `<|end_of_text|>`
    and r=9 `<|eot_id|>`, mirroring Llama 3's ids 128000, 128001 and 128009.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=text_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    if tokenizer.get_vocab_size() != text_vocab_size:
        raise RuntimeError(f"tiny BPE trained to {tokenizer.get_vocab_size()} entries, wanted {text_vocab_size}")
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 9: "<|eot_id|>"}
    reserved = [named.get(r, f"<|reserved_special_token_{r}|>") for r in range(num_reserved)]
    tokenizer.add_special_tokens(reserved + added_tokens)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return tokenizer

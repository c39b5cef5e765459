"""Chatterbox's English text front end: punctuation clean-up and the ``tokenizer.json`` grapheme/BPE tokenizer.

What ``ChatterboxTTS.generate`` does to a text before T3, in our own code:

1. ``punc_norm``: an empty text becomes a fixed sentence; a lower-case first character is capitalised; runs of
   whitespace collapse to one space; ``...``/``…`` -> ``, ``, ``:`` -> ``,``, `` - `` -> ``, ``, ``;`` -> ``, ``,
   em/en dashes -> ``-``, `` ,`` -> ``,``, curly quotes -> straight ones (in that order); trailing spaces are
   dropped and a ``.`` is added unless the text ends with one of ``. ! ? - ,``.
2. ``EnTokenizer.encode``: every ASCII space becomes the literal ``[SPACE]`` (an added token of tokenizer.json), then
   the ``tokenizers`` pipeline of the file runs (Whitespace pre-tokenizer, BPE with ``[UNK]``), no post-processor.
3. T3's text ids: ``[255] + ids + [0]`` (``[START]`` / ``[STOP]``).

API:

    punc_norm(text) -> str
    ChatterboxTextTokenizer(path)        tokenizer.json, or a directory holding it; ValueError without [START]/[STOP]
        .encode(text) -> list[int]       step 2 only (no normalisation, no start/stop)
        .text_ids(text, normalize=True) -> list[int]     [START_TEXT_TOKEN] + encode(punc_norm(text)) + [STOP]
        .decode(ids) -> str              the publisher's decode: [SPACE] -> " ", [STOP]/[UNK] dropped
        .vocab_size -> int
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

START_TEXT_TOKEN = 255
STOP_TEXT_TOKEN = 0
SOT, EOT, UNK, SPACE = "[START]", "[STOP]", "[UNK]", "[SPACE]"
SPECIAL_TOKENS = (SOT, EOT, UNK, SPACE, "[PAD]", "[SEP]", "[CLS]", "[MASK]")
FILE_NAME = "tokenizer.json"
EMPTY_TEXT = "You need to add some text for me to talk."  # what the publisher says for an empty text
SENTENCE_ENDERS = (".", "!", "?", "-", ",")
# applied in order: each rule sees the output of the previous ones
PUNCTUATION_RULES = (
    ("...", ", "), ("\u2026", ", "), (":", ","), (" - ", ", "), (";", ", "), ("\u2014", "-"), ("\u2013", "-"),
    (" ,", ","), ("\u201c", '"'), ("\u201d", '"'), ("\u2018", "'"), ("\u2019", "'"),
)


def punc_norm(text: str) -> str:
    """The publisher's clean-up of punctuation that LLMs produce or its training data rarely had."""
    if not text:
        return EMPTY_TEXT
    if text[0].islower():
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in PUNCTUATION_RULES:
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if not text.endswith(SENTENCE_ENDERS):
        text += "."
    return text


class ChatterboxTextTokenizer:
    """The publisher's EnTokenizer over its tokenizer.json (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: point at a Chatterbox checkpoint's tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(path))
        vocab = self.tokenizer.get_vocab()
        missing = [token for token in (SOT, EOT) if token not in vocab]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}: not a Chatterbox tokenizer.json")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Raw text -> ids, spaces spelled as [SPACE] (no punc_norm, no start/stop)."""
        return list(self.tokenizer.encode(text.replace(" ", SPACE)).ids)

    def text_ids(self, text: str, normalize: bool = True) -> list[int]:
        """What T3 reads: [255] + encode(punc_norm(text)) + [0]."""
        body = self.encode(punc_norm(text) if normalize else text)
        return [START_TEXT_TOKEN, *body, STOP_TEXT_TOKEN]

    def decode(self, ids) -> str:
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
        for old, new in ((" ", ""), (SPACE, " "), (EOT, ""), (UNK, "")):
            text = text.replace(old, new)
        return text

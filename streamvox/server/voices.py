"""Voice names as clients send them: the model's own, or OpenAI's, mapped onto the model's through a table.

OpenAI clients and the TTS plugins of voice-agent frameworks send OpenAI's voice names by default (`alloy`,
`ash`, ...). Each of those names a voice of the served model: OpenAI's voices in their listed order take the
model's voices in theirs, starting again from the first when the model has fewer (a model without named voices
speaks in its default). `--voice-alias NAME=VOICE` (repeatable) sets or adds an entry; its VOICE must be one of
the model's. A model's own voice name always wins over an alias.
"""

from __future__ import annotations

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar")


def parse_aliases(entries: tuple[str, ...]) -> dict[str, str]:
    """`NAME=VOICE` entries as a table (names without regard to case); ValueError for a malformed one."""
    table = {}
    for entry in entries:
        name, is_pair, voice = entry.partition("=")
        if not is_pair or not name.strip() or not voice.strip():
            raise ValueError(f"--voice-alias {entry!r} must be NAME=VOICE, e.g. alloy=tara")
        table[name.strip().casefold()] = voice.strip()
    return table


def alias_table(model_voices: list[str], configured: dict[str, str]) -> dict[str, str | None]:
    """Every alias -> the model's voice it names (None: the model's default voice)."""
    table: dict[str, str | None] = {
        name: model_voices[i % len(model_voices)] if model_voices else None for i, name in enumerate(OPENAI_VOICES)}
    return table | configured


def resolve(voice: str, model_voices: list[str], configured: dict[str, str]) -> tuple[bool, str | None]:
    """(found, the model's voice) for a voice name a client sent: the model's own (matched without regard to case
    when that is unambiguous), else an alias. A configured alias to a voice the model lacks is not found."""
    if voice in model_voices:
        return True, voice
    matches = [name for name in model_voices if name.casefold() == voice.casefold()]
    if len(matches) == 1:
        return True, matches[0]
    table = alias_table(model_voices, configured)
    key = voice.casefold()
    if key not in table or (table[key] is not None and table[key] not in model_voices):
        return False, None
    return True, table[key]

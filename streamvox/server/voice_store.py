"""Voices that clients store: a clip of a voice and its transcript, under a name any route's `voice` can then use.

For families that clone from reference audio. `POST /v1/audio/voices` (multipart: `name`, `audio`, `text`) checks
the clip as a request's reference would be checked and saves it, at the model's sample rate, as
`<data dir>/voices/<served model>/<name>.wav` with `<name>.json` beside it; the store is read at start, so stored
voices survive restarts. A request naming one sends its clip as the reference: the engine computes a clip's
conditioning once and keeps it (bounded, by content), so a stored voice in steady use costs it nothing more.
"""

from __future__ import annotations

import json
import os
import re
import time
import wave
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DATA_ENV = "STREAMVOX_DATA"


def data_dir(configured: str) -> Path:
    """The server's data directory: the flag's, else $STREAMVOX_DATA, else ~/.local/share/streamvox."""
    return Path(configured or os.environ.get(DATA_ENV) or Path.home() / ".local" / "share" / "streamvox")


class VoiceStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._voices: dict[str, dict] = {}  # casefolded name -> its record (name, text, sample_rate, file)
        if directory.is_dir():
            for path in sorted(directory.glob("*.json")):
                record = json.loads(path.read_text())
                self._voices[record["name"].casefold()] = record

    def names(self) -> list[str]:
        return [record["name"] for record in self._voices.values()]

    def get(self, name: str) -> tuple[bytes, str] | None:
        """(int16 PCM at the model's rate, transcript) of a stored voice (the name matched without regard to
        case), or None."""
        record = self._voices.get(name.casefold())
        if record is None:
            return None
        with wave.open(str(self.directory / record["file"])) as clip:
            return clip.readframes(clip.getnframes()), record["text"]

    def add(self, name: str, pcm: bytes, text: str, sample_rate: int) -> dict:
        """Store a voice (the caller has checked the name is free); its record."""
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"name": name, "text": text, "sample_rate": sample_rate, "file": f"{name}.wav",
                  "duration_s": round(len(pcm) / 2 / sample_rate, 3), "created": int(time.time())}
        partial = self.directory / f".{name}.wav.partial"
        with wave.open(str(partial), "wb") as clip:
            clip.setnchannels(1)
            clip.setsampwidth(2)
            clip.setframerate(sample_rate)
            clip.writeframes(pcm)
        os.replace(partial, self.directory / record["file"])
        partial.with_suffix(".json").write_text(json.dumps(record))  # the record last: it makes the voice exist
        os.replace(partial.with_suffix(".json"), self.directory / f"{name}.json")
        self._voices[name.casefold()] = record
        return record

    def remove(self, name: str) -> bool:
        record = self._voices.pop(name.casefold(), None)
        if record is None:
            return False
        (self.directory / f"{record['name']}.json").unlink(missing_ok=True)
        (self.directory / record["file"]).unlink(missing_ok=True)
        return True

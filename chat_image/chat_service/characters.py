"""Characters: who the service can speak as, loaded from a JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

# Character names become Kubernetes label values and path segments (`lora_<name>`), so keep them DNS-label-like.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class GenerationDefaults(BaseModel):
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)

    def for_request(
        self, max_tokens: int | None, temperature: float | None, top_p: float | None = None
    ) -> dict[str, Any]:
        """A request's sampling parameters: what it sets, these defaults for the rest (temperature 0 is greedy)."""
        return {
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": self.temperature if temperature is None else temperature,
            "top_p": top_p or self.top_p,
        }


class Character(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    display_name: str = Field(min_length=1)
    persona: str = ""
    generation: GenerationDefaults = GenerationDefaults()


class CharacterFile(BaseModel):
    characters: list[Character] = Field(min_length=1)


class CharacterConfigError(ValueError):
    """The character file cannot be used; the message says which file and why."""


def load_characters(path: Path) -> dict[str, Character]:
    """Read and validate the character file; names must be unique."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        parsed = CharacterFile.model_validate(raw)
    except (OSError, json.JSONDecodeError, ValidationError) as exc:
        raise CharacterConfigError(f"cannot load characters from {path}: {exc}") from exc
    characters: dict[str, Character] = {}
    for character in parsed.characters:
        if character.name in characters:
            raise CharacterConfigError(f"cannot load characters from {path}: duplicate name {character.name!r}")
        characters[character.name] = character
    return characters

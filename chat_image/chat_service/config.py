"""Service settings: environment variables first, command-line flags on top (flags win)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

DEFAULT_CHARACTERS_FILE = Path(__file__).with_name("characters.json")

# Environment variable for each setting. The first four are shared with the pod spec the operator writes,
# so they carry no prefix; the tuning knobs are prefixed to keep the pod's environment readable.
ENV_VARS: dict[str, str] = {
    "database_url": "DATABASE_URL",
    "base_model": "BASE_MODEL",
    "adapters_root": "ADAPTERS_ROOT",
    "history_token": "HISTORY_TOKEN",
    "history_token_file": "HISTORY_TOKEN_FILE",
    "characters_file": "CHAT_CHARACTERS_FILE",
    "device": "CHAT_DEVICE",
    "torch_threads": "CHAT_TORCH_THREADS",
    "max_body_bytes": "CHAT_MAX_BODY_BYTES",
    "max_import_bytes": "CHAT_MAX_IMPORT_BYTES",
    "max_message_chars": "CHAT_MAX_MESSAGE_CHARS",
    "max_tokens_limit": "CHAT_MAX_TOKENS_LIMIT",
    "max_prompt_tokens": "CHAT_MAX_PROMPT_TOKENS",
    "context_messages": "CHAT_CONTEXT_MESSAGES",
    "context_chars": "CHAT_CONTEXT_CHARS",
    "log_level": "CHAT_LOG_LEVEL",
}


class Settings(BaseModel):
    """Everything the service needs to start. Build it in Python for tests and benchmarks, or with `from_env`."""

    database_url: str = Field("sqlite:///chat.db", description="SQLAlchemy URL; SQLite file or postgresql+psycopg://")
    base_model: str = Field("gpt2", description="path or hub id of the base causal LM, loaded with from_pretrained")
    adapters_root: Path = Field(Path("/models"), description="holds lora_<character>/ adapter directories")
    history_token: str | None = Field(None, description="bearer token for GET /v1/history")
    history_token_file: Path | None = Field(None, description="file holding the token (a mounted Secret)")
    characters_file: Path = Field(DEFAULT_CHARACTERS_FILE, description="JSON file with the character list")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: torch's own")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="request bodies above this get 413")
    max_import_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="body limit of POST /v1/history (import)")
    max_message_chars: int = Field(4000, ge=1, description="longer user messages get 422")
    max_tokens_limit: int = Field(512, ge=1, description="upper bound for a request's max_tokens")
    max_prompt_tokens: int = Field(1024, ge=16, description="prompts are cut to this many tokens, oldest context first")
    context_messages: int = Field(
        0, ge=0, description="earlier session turns in the prompt's input when the adapter's manifest does not say"
    )
    context_chars: int = Field(1000, ge=0, description="that context is cut to its last this many characters")
    log_level: str = Field("info")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from environment variables (see ENV_VARS); keyword overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {key: env[var] for key, var in ENV_VARS.items() if env.get(var, "") != ""}
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    def resolved_history_token(self) -> str | None:
        """The history token: the file (a mounted Secret) wins over the plain variable when both are set."""
        if self.history_token_file is not None:
            token = self.history_token_file.read_text(encoding="utf-8").strip()
            if not token:
                raise ValueError(f"history token file {self.history_token_file} is empty")
            return token
        return self.history_token or None


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Settings, str, int]:
    """Parse `python -m chat_service` flags; returns the settings and the host/port to listen on."""
    parser = argparse.ArgumentParser(prog="python -m chat_service", description="Character chat service.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--db", type=Path, help="SQLite file for the store (sets DATABASE_URL to sqlite:///<file>)")
    parser.add_argument("--database-url", help="SQLAlchemy URL [DATABASE_URL]")
    parser.add_argument("--base-model", help="base model path or id [BASE_MODEL]")
    parser.add_argument("--adapters-root", type=Path, help="adapter mount root [ADAPTERS_ROOT, default /models]")
    parser.add_argument("--characters-file", type=Path, help="character list JSON [CHAT_CHARACTERS_FILE]")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N [CHAT_DEVICE]")
    parser.add_argument("--max-body-bytes", type=int, help="request body limit [CHAT_MAX_BODY_BYTES, default 65536]")
    parser.add_argument("--log-level", help="uvicorn/app log level [CHAT_LOG_LEVEL, default info]")
    args = parser.parse_args(argv)
    if args.db is not None and args.database_url is not None:
        parser.error("--db and --database-url are mutually exclusive")
    database_url = f"sqlite:///{args.db}" if args.db is not None else args.database_url
    try:
        settings = Settings.from_env(
            environ,
            database_url=database_url,
            base_model=args.base_model,
            adapters_root=args.adapters_root,
            characters_file=args.characters_file,
            device=args.device,
            max_body_bytes=args.max_body_bytes,
            log_level=args.log_level,
        )
    except ValidationError as exc:
        # Name the environment variable too: most settings arrive that way in a pod.
        problems = "; ".join(
            f"{err['loc'][0]} ({ENV_VARS.get(str(err['loc'][0]), 'flag')}): {err['msg']}" for err in exc.errors()
        )
        parser.error(f"invalid settings: {problems}")
    return settings, args.host, args.port

"""Service settings: environment variables first, command-line flags on top (flags win).

Each setting's variable is `CHAT_<NAME>` (e.g. `max_body_bytes` ← `CHAT_MAX_BODY_BYTES`), except the few shared with
the pod spec the operator writes, which carry no prefix (their `validation_alias`). An empty variable keeps the default.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, InitSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

DEFAULT_CHARACTERS_FILE = Path(__file__).with_name("characters.json")
ENV_PREFIX = "CHAT_"


class Settings(BaseSettings):
    """Everything the service needs to start. `Settings()` reads the environment, keyword arguments win over it;
    `from_env` also takes the environment as a mapping."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,
        validate_by_name=True,  # Settings(database_url=...) as well as the variable name
        loc_by_alias=False,  # errors name the setting; `env_var` names its variable
    )

    database_url: str = Field(
        "sqlite:///chat.db",
        validation_alias="DATABASE_URL",
        description="SQLAlchemy URL; SQLite file or postgresql+psycopg://",
    )
    base_model: str = Field(
        "gpt2",
        validation_alias="BASE_MODEL",
        description="path or hub id of the base causal LM, loaded with from_pretrained",
    )
    adapters_root: Path = Field(
        Path("/models"), validation_alias="ADAPTERS_ROOT", description="holds lora_<character>/ adapter directories"
    )
    history_token: str | None = Field(
        None, validation_alias="HISTORY_TOKEN", description="bearer token for GET /v1/history"
    )
    history_token_file: Path | None = Field(
        None, validation_alias="HISTORY_TOKEN_FILE", description="file holding the token (a mounted Secret)"
    )
    mcp_token: str | None = Field(None, description="bearer token for the MCP endpoint /mcp")
    mcp_token_file: Path | None = Field(None, description="file holding the MCP token (a mounted Secret)")
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
    shutdown_grace_seconds: float = Field(
        45.0, gt=0, description="after SIGTERM, how long requests and streams in flight may take to finish"
    )
    engine: Literal["inprocess", "openai"] = Field(
        "inprocess", description="who generates: this process (transformers + PEFT) or an OpenAI-compatible engine"
    )
    engine_url: str | None = Field(
        None, validate_default=True, description="with engine openai: the engine's base URL (vLLM)"
    )
    engine_adapters_root: str = Field(
        "/adapters", description="where the engine pod mounts the adapter volume (it loads lora_<c>/<version>/)"
    )
    engine_serving_dir: Path | None = Field(
        None,
        description="with engine openai: a folder with one file per character holding the version it serves (the "
        "operator's ConfigMap, mounted); set, versions are read from engine_adapters_root/lora_<c>/<version>/ "
        "(the adapter volume mounted at the engine's path) instead of ADAPTERS_ROOT, and PUT "
        "/v1/admin/adapters/{name} switches them without a restart",
    )
    admin_token: str | None = Field(None, description="bearer token for /v1/admin (the operator's hot switch)")
    admin_token_file: Path | None = Field(None, description="file holding the admin token (a mounted Secret)")
    engine_base_name: str = Field("base", description="the engine's served model name of the base model")
    engine_concurrency: int = Field(64, ge=1, description="generations in flight to the engine at once")
    engine_timeout: float = Field(120.0, gt=0, description="seconds one engine request may take")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("engine_url")
    @classmethod
    def _check_engine_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("engine") == "openai" and not value:
            raise ValueError("required with CHAT_ENGINE=openai")
        return value.rstrip("/") if value else value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `environ` (default: the process environment); keyword overrides that are not None win."""
        given = {key: value for key, value in overrides.items() if value is not None}
        if environ is None:
            return cls(**given)
        sources = (InitSettingsSource(cls, init_kwargs=given), _MappingEnvSource(cls, environ))
        return cls(_build_sources=(sources, given))

    def resolved_history_token(self) -> str | None:
        """The history token: the file (a mounted Secret) wins over the plain variable when both are set."""
        return _token(self.history_token, self.history_token_file, "history")

    def resolved_admin_token(self) -> str | None:
        """The admin endpoint's token, by the same rule (None: /v1/admin refuses every request)."""
        return _token(self.admin_token, self.admin_token_file, "admin")

    def resolved_mcp_token(self) -> str | None:
        """The MCP endpoint's token, by the same rule (None: /mcp refuses every request)."""
        return _token(self.mcp_token, self.mcp_token_file, "MCP")


def _token(value: str | None, file: Path | None, name: str) -> str | None:
    if file is not None:
        token = file.read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"{name} token file {file} is empty")
        return token
    return value or None


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of `os.environ`."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def env_var(setting: str) -> str:
    """The environment variable a setting is read from."""
    alias = Settings.model_fields[setting].validation_alias
    return alias if isinstance(alias, str) else f"{ENV_PREFIX}{setting.upper()}"


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
        problems = "; ".join(f"{err['loc'][0]} ({env_var(str(err['loc'][0]))}): {err['msg']}" for err in exc.errors())
        parser.error(f"invalid settings: {problems}")
    return settings, args.host, args.port

"""Request and response bodies (they are also the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field

SESSION_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"
# Numbers, booleans and times in request bodies take the JSON type their schema names and nothing converted to it
# (`false` is not a number, "3" is not an integer, 0 is not a time), as the OpenAPI document says; 3.0 is an integer,
# as in JSON Schema.


def _json_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("Input should be a JSON number")
    return value


def _rfc3339_text(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("expected an RFC 3339 string with an offset, e.g. 2026-11-20T10:00:00Z")
    return value


# Last in a field's Annotated[...], after its bounds (before them, the bounds leave the JSON schema).
JSON_NUMBER = BeforeValidator(_json_number)
Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text)]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    character: str = Field(description="character name, see GET /v1/characters", examples=["lumina"])
    session_id: str | None = Field(
        None, pattern=SESSION_PATTERN, description="conversation id; omitted → a new session is started"
    )
    message: str = Field(min_length=1, description="the user's message (length limit: CHAT_MAX_MESSAGE_CHARS)")
    max_tokens: Annotated[int, Field(ge=1), JSON_NUMBER] | None = Field(
        None, description="reply length limit; default from the character"
    )
    temperature: Annotated[float, Field(ge=0.0, le=2.0), JSON_NUMBER] | None = Field(
        None, description="0 = greedy; default from the character"
    )


class ChatResponse(BaseModel):
    reply: str
    message_id: int = Field(description="id of the stored reply; use it for feedback")
    user_message_id: int
    session_id: str
    character: str
    adapter_version: str = Field(description="adapter version that produced the reply, or 'base'")
    prompt_tokens: int = Field(description="prompt length after the context and length rules")
    completion_tokens: int


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message_id: Annotated[int, Field(ge=1), JSON_NUMBER] = Field(description="message_id of an assistant reply")
    feedback: Literal["up", "down"]


class FeedbackResponse(BaseModel):
    message_id: int
    feedback: Literal["up", "down"]
    character: str
    session_id: str


class VersionFeedbackInfo(BaseModel):
    version: str | None = Field(description="adapter version that wrote the replies, 'base', or null (imported)")
    up: int
    down: int
    rated: int = Field(description="up + down: replies with a vote (each counts once, its latest vote)")
    down_rate: float = Field(description="down / rated (versions without votes are not listed)")


class CharacterFeedback(BaseModel):
    character: str
    serving_version: str | None = Field(description="what answers now ('base' without an adapter; null while loading)")
    versions: list[VersionFeedbackInfo] = Field(description="base first, then versions oldest first, null last")


class HistoryMessage(BaseModel):
    id: int
    session_id: str
    character: str
    role: Literal["user", "assistant"]
    content: str
    created_at: str = Field(description="RFC 3339, UTC, microseconds", examples=["2026-11-20T10:00:00.123456Z"])
    feedback: Literal["up", "down"] | None


class HistoryPage(BaseModel):
    messages: list[HistoryMessage]
    next_cursor: str | None = Field(description="pass back as `cursor` for the next page; null on the last page")


class ImportMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(pattern=SESSION_PATTERN)
    character: str
    role: Literal["user", "assistant"]
    content: str
    created_at: Rfc3339 = Field(description="RFC 3339 with offset; kept as recorded")
    feedback: Literal["up", "down"] | None = Field(None, description="assistant messages only")


class ImportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[ImportMessage] = Field(min_length=1, max_length=1000)


class ImportResponse(BaseModel):
    ids: list[int] = Field(description="the new messages' ids, in request order")


class AdapterInfo(BaseModel):
    state: Literal["loading", "loaded", "absent", "failed"]
    version: str | None = Field(description="adapter version when loaded")
    reason: str | None = None
    error: str | None = None
    warnings: list[str] = []


class CharacterInfo(BaseModel):
    name: str
    display_name: str
    persona: str
    generation: dict[str, Any]
    adapter_version: str | None = Field(description="what answers now: adapter version, 'base', or null while loading")
    adapter: AdapterInfo


class CharacterList(BaseModel):
    characters: list[CharacterInfo]


# ---- OpenAI-compatible chat completions (the subset that matters; unknown fields are accepted and ignored).


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class CompletionRequest(BaseModel):
    # OpenAI clients send many optional parameters; ignoring the ones without meaning here keeps them working.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="the character name", examples=["lumina"])
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1), JSON_NUMBER] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), JSON_NUMBER] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0), JSON_NUMBER] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0), JSON_NUMBER] | None = None
    n: Annotated[int, Field(ge=1, le=1), JSON_NUMBER] = Field(1, description="only 1 is supported")
    stream: bool = Field(False, strict=True)
    user: str | None = Field(None, description="stored as the session id when no X-Session-Id header is sent")

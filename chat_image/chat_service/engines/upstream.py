"""Generation through an OpenAI-compatible engine (vLLM `/v1/completions`), the prompt rendered by this service.

The service renders and tokenizes the prompt itself (`prompting.prompt_ids`, the trainer's rule) and sends the token
ids, so the engine sees exactly the sequence the adapter was trained on; it decodes the reply's token ids with the
same tokenizer as the in-process engine. A character with an adapter is served under the version-unique name
`<character>-<version>`: a name never stands for two sets of weights (vLLM caches by name, vLLM #42125).

At start the service loads every mounted version into the engine from `CHAT_ENGINE_ADAPTERS_ROOT/lora_<c>/<version>`
(the adapter volume as the engine pod mounts it); one the engine refuses is reported as failed and its character
serves the base model, as in-process. When the engine does not know a name later (it restarted, or scaled up), the
service loads it again and retries once, so a restarted engine serves the current versions without anyone's help.

With CHAT_ENGINE_SERVING_DIR (deploy/vllm) nothing is mounted per version: the folder (the operator's ConfigMap) says
which version each character serves at start, the service reads that version's manifest from the adapter volume, and
`switch` (PUT /v1/admin/adapters/{name}, the operator's hot promotion) changes it while the service runs; a version
that cannot be used is refused and the current one keeps serving (docs/contracts.md §6).
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ..characters import Character
from ..config import Settings
from ..generation import (
    AdapterError,
    AdapterStatus,
    GenerationResult,
    ModelManager,
    StreamHandle,
    mark_failed,
    read_adapter,
)
from ..model_source import load_options
from ..prompting import Prompt
from . import EngineUnavailable

log = logging.getLogger(__name__)

_END = object()
# A version as a path segment of the adapter volume (contract §2): no "/", no leading "." (work in progress).
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class UpstreamEngine(ModelManager):
    """ModelManager's adapter bookkeeping and prompt window; the generation itself happens in the engine."""

    def __init__(self, settings: Settings, characters: dict[str, Character], client: httpx.Client | None = None):
        super().__init__(settings, characters)
        assert settings.engine_url, "Settings validation requires engine_url with engine openai"
        self.url = settings.engine_url
        self.device = f"engine {self.url}"
        self.client = client or httpx.Client(base_url=self.url, timeout=settings.engine_timeout)
        self._switching = threading.Lock()

    # ---------------------------------------------------------------- loading

    def load(self) -> None:
        """The tokenizer and the adapters' manifests (no weights: the engine holds them); then wait for the engine."""
        from transformers import AutoTokenizer

        base = self.settings.base_model
        self.tokenizer = AutoTokenizer.from_pretrained(base, **load_options(base))
        for name in self.characters:
            self.adapters[name] = self.read_version(name, self.startup_version(name))
        self.max_positions = self._wait_for_engine()
        for status in self.adapters.values():
            self._preload(status)
        self.loaded = True
        log.info(
            "engine %s serves %s (max_model_len %s); adapters: %s",
            self.url,
            self.settings.engine_base_name,
            self.max_positions,
            {n: self.model_name(s) for n, s in self.adapters.items()},
        )

    def startup_version(self, name: str) -> str | None:
        """With a serving folder: the version its file names for `name` (none: the base model)."""
        folder = self.settings.engine_serving_dir
        if folder is None or not (folder / name).is_file():
            return None
        return (folder / name).read_text(encoding="utf-8").strip() or None

    def read_version(self, name: str, version: str | None) -> AdapterStatus:
        """`name`'s adapter checked on disk: without a serving folder the operator's mount ADAPTERS_ROOT/lora_<name>;
        with one, `version` on the adapter volume (None: the base model), whose manifest must name that version."""
        if self.settings.engine_serving_dir is None:
            directory = self.settings.adapters_root / f"lora_{name}"
        elif version is None:
            return AdapterStatus(character=name, state="absent", path=self.settings.engine_serving_dir / name)
        else:
            directory = Path(self.settings.engine_adapters_root) / f"lora_{name}" / version
        status = read_adapter(directory, name, self.settings.base_model, self.chat_template)
        if version is not None and status.state == "absent":
            mark_failed(status, AdapterError("missing_version", f"{directory} holds no adapter"))
        elif version is not None and status.state == "loaded" and status.version != version:
            mark_failed(status, AdapterError("version_mismatch", f"{directory}/manifest.json says version "
                                                                 f"{status.version!r}"))
        return status

    def switch(self, name: str, version: str | None) -> AdapterStatus:
        """Serve `version` (None: the base model) for `name` from the next request on, loaded into the engine first.
        Raises AdapterError (or EngineUnavailable, in vLLM's words) when it cannot be used: the current one keeps
        serving. Requests already under way finish with what they started with."""
        if self.settings.engine_serving_dir is None:
            raise AdapterError("not_switchable", "versions are mounted (no CHAT_ENGINE_SERVING_DIR): a new one rolls "
                                                 "the pods")
        if version is not None and not VERSION.match(version):
            raise AdapterError("invalid_version", f"version {version!r} is not a version folder name")
        with self._switching:
            current = self.adapters.get(name)
            if current is not None and current.version == version and (version is None or current.state == "loaded"):
                return current
            status = self.read_version(name, version)
            if status.state == "failed":
                raise AdapterError(status.reason or "failed", status.error or "adapter not usable")
            if status.state == "loaded":
                self.load_into_engine(status)
            self.adapters[name] = status
            log.info("%s now serves %s", name, status.serving_version)
            return status

    def _wait_for_engine(self) -> int | None:
        """Poll the engine's model list until it answers (an engine starts in minutes); its base model's length."""
        waited = False
        while True:
            try:
                response = self.client.get("/v1/models")
                if response.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if not waited:
                log.warning("waiting for the generation engine at %s", self.url)
                waited = True
            time.sleep(2)
        models = {entry["id"]: entry for entry in response.json().get("data", [])}
        base = models.get(self.settings.engine_base_name)
        if base is None:
            raise RuntimeError(
                f"engine {self.url} does not serve {self.settings.engine_base_name!r} (CHAT_ENGINE_BASE_NAME); "
                f"it serves {sorted(models)}"
            )
        return base.get("max_model_len")

    def _preload(self, adapter: AdapterStatus) -> None:
        """Load a mounted version into the engine now, so the first reply does not wait for it and an adapter the
        engine refuses is reported like one this process could not load: the character serves the base model and
        /readyz says why (in vLLM's words)."""
        if adapter.state != "loaded":
            return
        try:
            self.load_into_engine(adapter)
        except EngineUnavailable as exc:
            mark_failed(adapter, AdapterError("engine_refused", str(exc)))

    # ---------------------------------------------------------------- generation

    def model_name(self, adapter: AdapterStatus) -> str:
        """The engine's name for what `adapter`'s character serves: the version-unique adapter name, or the base."""
        if adapter.state == "loaded" and adapter.version:
            return f"{adapter.character}-{adapter.version}"
        return self.settings.engine_base_name

    def _request(self, adapter: AdapterStatus, prompt: Prompt, max_tokens: int, temperature: float, top_p: float,
                 stream: bool) -> dict[str, Any]:
        ids, max_new = self._window(prompt, max_tokens)
        body: dict[str, Any] = {
            "model": self.model_name(adapter),
            "prompt": ids,
            "max_tokens": max_new,
            "temperature": temperature,
            "top_p": top_p if temperature > 0 else 1.0,
            "return_token_ids": True,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def generate(
        self,
        adapter: AdapterStatus,
        prompt: Prompt,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        **_: Any,
    ) -> GenerationResult:
        if not self.loaded:
            raise RuntimeError("engine is not connected")
        body = self._request(adapter, prompt, max_tokens, temperature, top_p, stream=False)
        started = time.perf_counter()
        response = self._post_with_adapter(adapter, body)
        answer = response.json()
        choice = answer["choices"][0]
        return self._result(adapter, body, answer["model"], choice["token_ids"], choice.get("finish_reason"),
                            time.perf_counter() - started)

    def _result(self, adapter: AdapterStatus, body: dict[str, Any], served: str, token_ids: list[int],
                finish_reason: str | None, seconds: float) -> GenerationResult:
        if served != body["model"]:
            # The reply's adapter_version must say what answered; an engine that substitutes a model is misconfigured.
            raise EngineUnavailable(f"engine answered with model {served!r}, asked for {body['model']!r}")
        return GenerationResult(
            text=self.tokenizer.decode(token_ids, skip_special_tokens=True).strip(),
            prompt_tokens=len(body["prompt"]),
            completion_tokens=len(token_ids),
            adapter_version=adapter.serving_version,
            finish_reason="length" if finish_reason == "length" else "stop",
            seconds=seconds,
        )

    def _post_with_adapter(self, adapter: AdapterStatus, body: dict[str, Any]) -> httpx.Response:
        """POST /v1/completions; if the engine does not know the adapter's name, load it and try once more."""
        response = self._send(lambda: self.client.post("/v1/completions", json=body))
        if response.status_code == 404 and body["model"] != self.settings.engine_base_name:
            self.load_into_engine(adapter)
            response = self._send(lambda: self.client.post("/v1/completions", json=body))
        if response.status_code != 200:
            raise EngineUnavailable(f"/v1/completions answered {response.status_code}: {error_message(response)}")
        return response

    def _send(self, call: Any) -> httpx.Response:
        try:
            return call()
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def load_into_engine(self, adapter: AdapterStatus) -> None:
        """Load `adapter`'s version into the engine from the adapter volume as the engine pod mounts it."""
        name = self.model_name(adapter)
        path = f"{self.settings.engine_adapters_root.rstrip('/')}/lora_{adapter.character}/{adapter.version}"
        log.info("loading %s into the engine from %s", name, path)
        response = self._send(
            lambda: self.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        )
        # 400 "already been loaded": another request (or the operator) loaded it meanwhile.
        if response.status_code != 200 and "already been loaded" not in error_message(response):
            raise EngineUnavailable(f"engine could not load {name} from {path}: {error_message(response)}")

    # ---------------------------------------------------------------- streaming

    def stream(
        self, adapter: AdapterStatus, prompt: Prompt, *, max_tokens: int, temperature: float, top_p: float
    ) -> StreamHandle:
        """The engine's SSE stream, read in a background thread; its text pieces are handed out as they arrive."""
        pieces: queue.Queue[Any] = queue.Queue()
        handle = StreamHandle(pieces=iter(pieces.get, _END))
        body = self._request(adapter, prompt, max_tokens, temperature, top_p, stream=True)

        def run() -> None:
            try:
                handle.result = self._stream_into(adapter, body, pieces, handle.cancel)
            except BaseException as exc:
                handle.error = exc
                log.exception("streamed generation for %s failed", adapter.character)
            finally:
                pieces.put(_END)

        handle.thread = threading.Thread(target=run, name=f"stream-{adapter.character}", daemon=True)
        handle.thread.start()
        return handle

    def _stream_into(
        self, adapter: AdapterStatus, body: dict[str, Any], pieces: queue.Queue[Any], cancel: threading.Event
    ) -> GenerationResult:
        started = time.perf_counter()
        for attempt in (1, 2):
            with self.client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code == 404 and attempt == 1 and body["model"] != self.settings.engine_base_name:
                    response.read()
                    self.load_into_engine(adapter)
                    continue
                if response.status_code != 200:
                    response.read()
                    raise EngineUnavailable(f"/v1/completions answered {response.status_code}: "
                                            f"{error_message(response)}")
                served, token_ids, finish = body["model"], [], None
                for event in sse_events(response.iter_lines()):
                    if cancel.is_set():
                        break  # closing the connection aborts the request in the engine
                    served = event.get("model", served)
                    for choice in event.get("choices", []):
                        token_ids += choice.get("token_ids") or []
                        finish = choice.get("finish_reason") or finish
                        if choice.get("text"):
                            pieces.put(choice["text"])
                return self._result(adapter, body, served, token_ids, finish, time.perf_counter() - started)
        raise EngineUnavailable(f"engine does not serve {body['model']} after loading it")


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of an OpenAI-style event stream, up to `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def error_message(response: httpx.Response) -> str:
    """vLLM's error text (`{"error": {"message": ...}}`), else the body as it is."""
    try:
        payload = response.json()
    except ValueError:
        return response.text[:500]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return response.text[:500]

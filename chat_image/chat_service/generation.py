"""The model: one base causal LM in memory plus one named PEFT LoRA adapter per character.

Adapter selection (`set_adapter` / `disable_adapter`) is state of the shared model object, so one lock covers
"select adapter + generate": requests are served one generation at a time, each with the right adapter. Callers run
`generate` in a worker thread; the event loop never blocks on the model.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .characters import Character
from .config import Settings
from .model_source import load_options
from .prompting import (
    DEFAULT_PROMPT_TEMPLATE,
    ManifestPrompt,
    Prompt,
    PromptFormat,
    manifest_prompt,
    prompt_ids,
    template_mismatch,
)

log = logging.getLogger(__name__)

BASE_VERSION = "base"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

AdapterState = Literal["loaded", "absent", "failed"]


@dataclass
class AdapterStatus:
    """What a character serves, and if its adapter could not be used, why."""

    character: str
    state: AdapterState
    path: Path
    version: str | None = None
    prompt_format: PromptFormat = "alpaca"  # from manifest prompt.format (schema 1: alpaca)
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    system: str = ""  # chat_template: the manifest's prompt.system, the system turn it was trained with
    context_turns: int | None = None  # from manifest data.context_turns: what the adapter was trained with
    context_chars: int | None = None  # from manifest data.context_chars: the trainer's cut of that context
    reason: str | None = None  # short machine-readable cause, also a metric label
    error: str | None = None  # the full message for people
    warnings: list[str] = field(default_factory=list)

    @property
    def serving_version(self) -> str:
        return self.version if self.state == "loaded" and self.version else BASE_VERSION


class AdapterError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    adapter_version: str
    finish_reason: Literal["stop", "length"]
    seconds: float


def read_manifest(directory: Path, character: str) -> dict[str, Any]:
    path = directory / "manifest.json"
    if not path.is_file():
        raise AdapterError("missing_manifest", f"{path} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError("invalid_manifest", f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise AdapterError("invalid_manifest", f"{path} must hold a JSON object")
    version = manifest.get("version")
    if not isinstance(version, str) or not version:
        raise AdapterError("invalid_manifest", f"{path} has no string 'version'")
    if manifest.get("character") not in (None, character):
        raise AdapterError(
            "wrong_character", f"{path} is for character {manifest.get('character')!r}, mounted for {character!r}"
        )
    data = manifest.get("data", {})
    for key in ("context_turns", "context_chars"):
        value = data.get(key) if isinstance(data, dict) else None
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise AdapterError("invalid_manifest", f"{path} 'data.{key}' must be a non-negative integer")
    return manifest


def adapter_prompt(manifest: dict[str, Any], path: Path, chat_template: str | None) -> ManifestPrompt:
    """The manifest's prompt format, if the base tokenizer (its `chat_template`) can render it (contract §2)."""
    try:
        prompt = manifest_prompt(manifest)
    except ValueError as exc:
        raise AdapterError("invalid_manifest", f"{path}/manifest.json: {exc}") from exc
    mismatch = template_mismatch(prompt, chat_template)
    if mismatch:
        raise AdapterError("prompt_mismatch", f"{path}: {mismatch}")
    return prompt


def read_adapter(directory: Path, name: str, base_model: str, chat_template: str | None = None) -> AdapterStatus:
    """The adapter mounted at `directory`, checked on disk (config, weights, manifest, prompt format against the base
    tokenizer's `chat_template`) without loading its weights: `absent`, `failed` with the reason, or `loaded` with
    the manifest's version and prompt rules (the engine that loads the weights turns it to `failed` if they do not fit
    the base model)."""
    from peft import PeftConfig

    status = AdapterStatus(character=name, state="absent", path=directory)
    # Kubernetes may leave an empty directory where nothing is mounted: that is "no adapter", not a fault.
    if not directory.is_dir() or not any(p for p in directory.iterdir() if not p.name.startswith(".")):
        return status
    try:
        if not (directory / "adapter_config.json").is_file():
            raise AdapterError("missing_config", f"{directory}/adapter_config.json is missing")
        manifest = read_manifest(directory, name)
        prompt = adapter_prompt(manifest, directory, chat_template)
        try:
            json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
            peft_config = PeftConfig.from_pretrained(str(directory))
        except Exception as exc:
            raise AdapterError("invalid_config", f"adapter_config.json is not a valid PEFT config: {exc}") from exc
        if not any((directory / f).is_file() for f in WEIGHT_FILES):
            raise AdapterError("missing_weights", f"{directory} has none of {', '.join(WEIGHT_FILES)}")
    except AdapterError as exc:
        mark_failed(status, exc)
        return status
    status.state = "loaded"
    status.version = manifest["version"]
    status.prompt_format, status.prompt_template, status.system = prompt.format, prompt.template, prompt.system
    data = manifest.get("data")
    status.context_turns = data.get("context_turns") if isinstance(data, dict) else None
    status.context_chars = data.get("context_chars") if isinstance(data, dict) else None
    for label, recorded in (
        ("manifest base_model", manifest.get("base_model")),
        ("adapter_config base_model_name_or_path", peft_config.base_model_name_or_path),
    ):
        # Paths differ between trainer and chat pods, so a different name is a warning; shapes decide.
        if recorded and recorded != base_model:
            status.warnings.append(f"{label} is {recorded!r}, serving base is {base_model!r}")
    return status


def mark_failed(status: AdapterStatus, exc: AdapterError) -> None:
    """The adapter is not used: the character serves the base model with the default prompt rules; say why."""
    status.state = "failed"
    status.version = None
    status.prompt_format, status.prompt_template, status.system = "alpaca", DEFAULT_PROMPT_TEMPLATE, ""
    status.context_turns = None
    status.context_chars = None
    status.reason = exc.reason
    status.error = str(exc)
    log.error("adapter for %s not used, serving base: %s", status.character, exc)


class ModelManager:
    """Loads the base model and the adapters once, then serves generations."""

    def __init__(self, settings: Settings, characters: dict[str, Character]) -> None:
        self.settings = settings
        self.characters = characters
        self.adapters: dict[str, AdapterStatus] = {}
        self.model: Any = None
        self.tokenizer: Any = None
        self.device: str = "cpu"
        self.max_positions: int | None = None
        self.loaded = False
        self.load_error: str | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- loading

    def load(self) -> None:
        """Load base and adapters. A broken adapter never raises; a base that cannot load does."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        device = self.settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        source = load_options(self.settings.base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.settings.base_model, **source)

        def load_base() -> Any:
            # bf16 halves GPU memory; CPU kernels are fastest and exact in fp32.
            dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
            model = AutoModelForCausalLM.from_pretrained(self.settings.base_model, dtype=dtype, **source)
            return model.to(device).eval()

        model = load_base()
        config = model.config
        self.max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        for name in self.characters:
            status, model = self._load_adapter(name, model, load_base)
            self.adapters[name] = status
        self.model = model.eval()
        self.loaded = True
        log.info(
            "model %s loaded on %s in %.1fs; adapters: %s",
            self.settings.base_model,
            device,
            time.perf_counter() - started,
            {n: (s.state, s.version, s.reason) for n, s in self.adapters.items()},
        )

    def _load_adapter(self, name: str, model: Any, load_base: Any) -> tuple[AdapterStatus, Any]:
        from peft import PeftModel

        status = read_adapter(self.settings.adapters_root / f"lora_{name}", name, self.settings.base_model,
                              self.chat_template)
        if status.state != "loaded":
            return status, model
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(str(status.path), adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, str(status.path), adapter_name=name)
        except Exception as exc:
            model = self._discard_adapter(model, name, load_base)
            mark_failed(status, AdapterError("incompatible", f"cannot load adapter onto the base model: {exc}"))
        return status, model

    def _discard_adapter(self, model: Any, name: str, load_base: Any) -> Any:
        """Remove a half-loaded adapter so that it cannot leak into other characters' generations."""
        from peft import PeftModel

        if isinstance(model, PeftModel):
            if name in model.peft_config:
                model.delete_adapter(name)
            return model
        # PeftModel.from_pretrained failed on a plain model: it may already have injected LoRA layers into it,
        # so the only safe state is a fresh base.
        return load_base()

    def switch(self, name: str, version: str | None) -> AdapterStatus:
        """Serve another version without a restart: only an upstream engine can (engines/upstream.py)."""
        raise AdapterError("not_switchable", "the in-process engine serves the versions mounted at its start; a new "
                                             "one rolls the pods")

    # ---------------------------------------------------------------- generation

    def adapter_for(self, character: str) -> AdapterStatus:
        return self.adapters.get(character) or AdapterStatus(
            character=character, state="absent", path=self.settings.adapters_root / f"lora_{character}"
        )

    def generate(
        self,
        adapter: AdapterStatus,
        prompt: Prompt,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        streamer: Any = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """The reply to `prompt` from `adapter`'s character with that adapter (or the base model, per its status)."""
        if not self.loaded:
            raise RuntimeError("model is not loaded")
        import torch

        ids, max_new = self._window(prompt, max_tokens)
        input_ids = torch.tensor([ids], device=self.device)
        kwargs = self._generate_kwargs(max_new, temperature, top_p, cancel)
        if streamer is not None:
            kwargs["streamer"] = streamer
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            with self._adapter_context(adapter):
                output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            seconds = time.perf_counter() - started
        new_ids = output[0, len(ids) :].tolist()
        eos = self.tokenizer.eos_token_id
        stopped = bool(new_ids) and eos is not None and new_ids[-1] == eos
        return GenerationResult(
            text=self.tokenizer.decode(new_ids, skip_special_tokens=True).strip(),
            prompt_tokens=len(ids),
            completion_tokens=len(new_ids),
            adapter_version=adapter.serving_version,
            finish_reason="stop" if stopped or (cancel is not None and cancel.is_set()) else "length",
            seconds=seconds,
        )

    def _window(self, prompt: Prompt, max_tokens: int) -> tuple[list[int], int]:
        """The prompt's token ids and the reply's token budget, both within the model's positions."""
        ids = prompt_ids(prompt, self.tokenizer, self.settings.max_prompt_tokens)
        max_new = max(1, min(max_tokens, self.settings.max_tokens_limit))
        if self.max_positions:
            # Positions beyond the model's window would crash or degrade; keep room for the reply.
            max_new = max(1, min(max_new, self.max_positions // 2))
            ids = ids[-(self.max_positions - max_new) :]
        return ids, max_new

    @property
    def chat_template(self) -> str | None:
        """The base tokenizer's chat template (None without one, or before loading): it decides the prompt format of
        the base model and which adapters' prompts can be served (contract §2)."""
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) and template.strip() else None

    def _generate_kwargs(
        self, max_new: int, temperature: float, top_p: float, cancel: threading.Event | None
    ) -> dict[str, Any]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return cancel is not None and cancel.is_set()

        eos = self.tokenizer.eos_token_id
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
            "eos_token_id": eos,
            "stopping_criteria": StoppingCriteriaList([_Cancelled()]),
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False)
        return kwargs

    def _adapter_context(self, adapter: AdapterStatus) -> AbstractContextManager[Any]:
        """Caller holds the lock. Select the character's adapter, or switch all adapters off for base."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return nullcontext()
        if adapter.state == "loaded":
            self.model.set_adapter(adapter.character)
            return nullcontext()
        return self.model.disable_adapter()

    def stream(
        self, adapter: AdapterStatus, prompt: Prompt, *, max_tokens: int, temperature: float, top_p: float
    ) -> StreamHandle:
        """Generate in a background thread and hand out the text as it is produced (see StreamHandle)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        handle = StreamHandle(pieces=iter(streamer))

        def run() -> None:
            try:
                handle.result = self.generate(
                    adapter,
                    prompt,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    streamer=streamer,
                    cancel=handle.cancel,
                )
            except BaseException as exc:
                handle.error = exc
                log.exception("streamed generation for %s failed", adapter.character)
            finally:
                # On failure generate() never ended the streamer; a stop signal unblocks the reader either way.
                streamer.text_queue.put(streamer.stop_signal)

        handle.thread = threading.Thread(target=run, name=f"generate-{adapter.character}", daemon=True)
        handle.thread.start()
        return handle


@dataclass
class StreamHandle:
    """A generation running in its own thread.

    Iterate `pieces` for the text; when it ends, `finish()` waits for the thread and returns the result (or raises
    its error). Setting `cancel` (the client went away) stops generation at the next token.
    """

    pieces: Iterator[str]
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None

    def finish(self) -> GenerationResult:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

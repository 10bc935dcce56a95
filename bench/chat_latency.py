"""Chat service latency with and without LoRA adapters, and history paging speed, over real HTTP.

    .venv/bin/python -m bench.chat_latency                  # ~2 min on 2 shared cores
    .venv/bin/python -m bench.chat_latency --quick          # smoke run, numbers mean nothing
    .venv/bin/python -m bench.chat_latency --database-url postgresql+psycopg://user@host/empty_db

Two ``python -m chat_service`` processes (as in a pod: own process, SQLite file — or both on the empty database
``--database-url`` names — ``CHAT_TORCH_THREADS``) on the embedded model:

- ``plain``: no adapter directory at all — the base model without PEFT;
- ``lora``: four characters with LoRA adapters (r 8 on the attention projections, the trainer's config, saved with
  ``save_pretrained`` plus a contract §2 ``manifest.json``) and one character without, served by the same PEFT model
  with the adapter disabled.

Adapters are freshly initialised (PEFT's default: random A, zero B), so every reply is token for token the base
model's reply: the scenarios generate the same tokens and differ only in the adapter's compute and switching. Personas
are empty, so base and adapter prompts are the same text. Greedy decoding, ``max_tokens`` fixed.

Scenarios, interleaved in rounds (so load on the shared machine hits them alike), each round a block of requests sent
by ``--clients`` concurrent clients (1: the service time alone; 4: with queueing — generation is serialised):

==============  ================================================================================================
base            ``plain`` service, character without adapter
base-on-peft    ``lora`` service, the character without adapter (``disable_adapter()`` on the PEFT model)
one adapter     ``lora`` service, always the same adapter character
mixed           ``lora`` service, the four adapter characters round-robin: every request switches adapter
==============  ================================================================================================

History: 10 000 and 100 000 messages imported through ``POST /v1/history``, then paged out with ``GET /v1/history``
(pages of 500 and 1000) as the trainer does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from devkit.harness import ChatProcess, make_adapter

from bench._common import log, machine, percentile, table, write_json

TOKEN = "bench-token"
ADAPTER_CHARACTERS = ("lumina", "sora", "hikari", "kumo")
BASE_CHARACTER = "plain"
HISTORY_CHARACTERS = ("archive-a", "archive-b")  # hold the imported history only: chat requests never touch them


def chat_service(name: str, workdir: Path, base_model: Path, adapters_root: Path, characters: Path, threads: int,
                 database_url: str | None) -> ChatProcess:
    store = ["--database-url", database_url] if database_url else ["--db", str(workdir / f"{name}.db")]
    env = {**os.environ, "HISTORY_TOKEN": TOKEN, "CHAT_TORCH_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    return ChatProcess([*store, "--base-model", str(base_model), "--adapters-root", str(adapters_root),
                        "--characters-file", str(characters), "--log-level", "warning"], env, workdir / f"{name}.log")


# -- chat latency -----------------------------------------------------------------------------------------------------


def run_block(url: str, characters: Sequence[str], prompts: Sequence[str], clients: int, max_tokens: int,
              tag: str) -> tuple[list[float], list[int], float]:
    """``len(prompts)`` requests from ``clients`` concurrent clients; returns latencies, reply tokens, wall time."""
    latencies: list[float] = []
    tokens: list[int] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        body = {"character": characters[index % len(characters)], "session_id": f"{tag.replace(' ', '-')}-{index}",
                "message": prompts[index], "max_tokens": max_tokens, "temperature": 0}
        started = time.perf_counter()
        response = http.post(f"{url}/v1/chat", json=body)
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        with lock:
            latencies.append(elapsed)
            tokens.append(int(response.json()["completion_tokens"]))

    with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(len(prompts))))
        wall = time.perf_counter() - started
    return latencies, tokens, wall


def chat_latency(services: dict[str, ChatProcess], prompts: list[str], rounds: int, per_block: int,
                 concurrency: Sequence[int], max_tokens: int) -> list[dict[str, Any]]:
    scenarios = {
        "base": (services["plain"].url, [BASE_CHARACTER]),
        "base-on-peft": (services["lora"].url, [BASE_CHARACTER]),
        "one adapter": (services["lora"].url, [ADAPTER_CHARACTERS[0]]),
        "mixed": (services["lora"].url, list(ADAPTER_CHARACTERS)),
    }
    # Warm-up: first calls pay for lazy initialisation (kernels, tokenizer caches, SQLite pages).
    for url, characters in scenarios.values():
        run_block(url, characters, prompts[:4], 1, max_tokens, "warmup")
    results = {(c, name): {"lat": [], "tokens": [], "wall": 0.0} for c in concurrency for name in scenarios}
    for r in range(rounds):
        block = prompts[(r * per_block) % len(prompts):][:per_block] or prompts[:per_block]
        # Rotate the order each round so no scenario always runs first after the others.
        order = list(scenarios)[r % len(scenarios):] + list(scenarios)[: r % len(scenarios)]
        for clients in concurrency:
            for name in order:
                url, characters = scenarios[name]
                lat, tok, wall = run_block(url, characters, block, clients, max_tokens, f"{name}-{clients}-{r}")
                res = results[(clients, name)]
                res["lat"] += lat
                res["tokens"] += tok
                res["wall"] += wall
        log(f"  round {r + 1}/{rounds}")
    rows = []
    for (clients, name), res in results.items():
        p50 = percentile(res["lat"], 50)
        base_p50 = percentile(results[(clients, "base")]["lat"], 50)
        rows.append({
            "clients": clients, "scenario": name, "requests": len(res["lat"]), "p50_ms": 1000 * p50,
            "p95_ms": 1000 * percentile(res["lat"], 95), "vs_base_pct": 100 * (p50 / base_p50 - 1),
            "req_per_s": len(res["lat"]) / res["wall"], "tokens_per_s": sum(res["tokens"]) / res["wall"],
            "mean_tokens": sum(res["tokens"]) / max(len(res["tokens"]), 1),
        })
    return rows


def generation_only(work: Path, base_model: Path, characters: Path, prompts: list[str], rounds: int,
                    max_tokens: int, threads: int) -> list[dict[str, Any]]:
    """The chat service's own ``ModelManager.generate`` in this process, no HTTP and no store: what the adapter costs
    the model itself. Runs before the services start, so nothing else competes for the cores."""
    from chat_service.characters import load_characters
    from chat_service.config import Settings as ChatSettings
    from chat_service.generation import ModelManager
    from chat_service.prompting import PromptRules, build_prompt

    managers = {}
    for name, root in (("plain", work / "plain-adapters"), ("lora", work / "adapters")):
        settings = ChatSettings(base_model=str(base_model), adapters_root=root, characters_file=characters,
                                device="cpu", torch_threads=threads)
        managers[name] = ModelManager(settings, load_characters(characters))
        managers[name].load()
    scenarios = {"base": ("plain", BASE_CHARACTER), "base-on-peft": ("lora", BASE_CHARACTER),
                 "one adapter": ("lora", ADAPTER_CHARACTERS[0])}
    times: dict[str, list[float]] = {name: [] for name in scenarios}
    for r in range(rounds):
        for prompt in prompts[r * 8 : r * 8 + 8]:
            for name, (manager, character) in scenarios.items():
                adapter = managers[manager].adapter_for(character)
                # No context, no persona, the base tokenizer's format: every scenario gets the same prompt.
                fmt = "chat_template" if managers[manager].chat_template else "alpaca"
                bare = build_prompt(PromptRules(adapter.prompt_template, 0, 0, "", fmt), prompt)
                started = time.perf_counter()
                managers[manager].generate(adapter, bare, max_tokens=max_tokens, temperature=0, top_p=1.0)
                times[name].append(time.perf_counter() - started)
    base_p50 = percentile(times["base"], 50)
    return [{"scenario": name, "calls": len(t), "p50_ms": 1000 * percentile(t, 50),
             "p95_ms": 1000 * percentile(t, 95), "vs_base_pct": 100 * (percentile(t, 50) / base_p50 - 1)}
            for name, t in times.items()]


# -- history paging ---------------------------------------------------------------------------------------------------


def import_history(url: str, messages: list[dict[str, Any]]) -> float:
    started = time.perf_counter()
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for i in range(0, len(messages), 1000):
            chunk = [{k: v for k, v in m.items() if k != "id"} for m in messages[i : i + 1000]]
            http.post(f"{url}/v1/history", json={"messages": chunk}).raise_for_status()
    return time.perf_counter() - started


def page_all(url: str, character: str, limit: int) -> dict[str, Any]:
    page_times: list[float] = []
    count = 0
    cursor = None
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        started = time.perf_counter()
        while True:
            params: dict[str, Any] = {"character": character, "limit": limit}
            if cursor:
                params["cursor"] = cursor
            t = time.perf_counter()
            response = http.get(f"{url}/v1/history", params=params)
            response.raise_for_status()
            body = response.json()
            page_times.append(time.perf_counter() - t)
            count += len(body["messages"])
            cursor = body["next_cursor"]
            if not cursor:
                break
        total = time.perf_counter() - started
    return {"messages": count, "limit": limit, "pages": len(page_times), "total_s": total,
            "messages_per_s": count / total, "page_p50_ms": 1000 * percentile(page_times, 50),
            "first_page_ms": 1000 * page_times[0], "last_page_ms": 1000 * page_times[-1]}


def history_paging(url: str, sizes: Sequence[int]) -> list[dict[str, Any]]:
    from devkit.conversations import generate_history

    end = datetime(2026, 11, 26, tzinfo=UTC)
    rows = []
    for size, character in zip(sizes, HISTORY_CHARACTERS, strict=False):
        # ~8 messages per session on average; trim to the exact size. Generated as lumina's, stored under `character`.
        messages = generate_history("lumina", sessions=size // 7 + 1, seed=7, start=end - timedelta(days=30),
                                    end=end)[:size]
        messages = [{**m, "character": character} for m in messages]
        log(f"  importing {len(messages)} messages for {character}")
        seconds = import_history(url, messages)
        for limit in (500, 1000):
            row = page_all(url, character, limit)
            rows.append({"size": len(messages), "import_s": seconds, **row})
            log(f"  paged {row['messages']} in {row['total_s']:.2f}s (limit {limit})")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-block", type=int, default=12, help="requests per scenario per round")
    parser.add_argument("--clients", default="1,4", help="concurrent clients, comma-separated levels")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="CHAT_TORCH_THREADS of each service")
    parser.add_argument("--history", default="10000,100000", help="history sizes to page (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="a few requests and 2000 messages: a smoke run")
    parser.add_argument("--database-url", help="both services' store, an empty database (default: a SQLite file each)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.per_block, args.history = 1, 4, "2000"

    from devkit.conversations import generate_history, user_turns
    from devkit.model import ensure_embedded_model

    base_model = ensure_embedded_model()
    end = datetime(2026, 11, 26, tzinfo=UTC)
    history = generate_history("lumina", sessions=60, seed=3, start=end - timedelta(days=30), end=end)
    prompts = [text for _, text in user_turns(history)]
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        work = Path(tmp)
        characters = work / "characters.json"
        names = (BASE_CHARACTER, *ADAPTER_CHARACTERS, *HISTORY_CHARACTERS)
        characters.write_text(json.dumps({"characters": [
            {"name": name, "display_name": name, "persona": ""} for name in names
        ]}), encoding="utf-8")
        (work / "plain-adapters").mkdir()
        for character in ADAPTER_CHARACTERS:
            # The trainer's LoRA shape, untrained: replies stay the base model's, only the adapter's compute is added.
            make_adapter(base_model, work / "adapters", character, "20261126T030000Z", untrained=True, r=8, alpha=16,
                         dropout=0.1)
        log("generation only (in-process)")
        generate_rows = generation_only(work, base_model, characters, prompts, args.rounds, args.max_tokens,
                                        args.threads)
        services = {name: chat_service(name, work, base_model, work / adapters, characters, args.threads,
                                       args.database_url)
                    for name, adapters in (("plain", "plain-adapters"), ("lora", "adapters"))}
        try:
            # One after the other: two services creating their tables at once in one database would race.
            ready = {name: service.start().wait_ready() for name, service in services.items()}
            serving = {c: v["state"] for c, v in ready["lora"]["characters"].items()}
            log(f"services ready; lora adapters: {serving}")
            log("chat latency")
            levels = [int(c) for c in args.clients.split(",") if c]
            chat_rows = chat_latency(services, prompts, args.rounds, args.per_block, levels, args.max_tokens)
            log("history paging")
            sizes = [int(s) for s in args.history.split(",") if s]
            history_rows = history_paging(services["lora"].url, sizes)
        finally:
            for service in services.values():
                service.stop()

    info = machine() | {"clients": args.clients, "max_tokens": args.max_tokens, "torch_threads": args.threads,
                        "store": (args.database_url or "sqlite").split(":")[0]}
    write_json(args.json, {"machine": info, "chat": chat_rows, "generate": generate_rows, "history": history_rows})
    print(f"\n{info}")
    print(table(chat_rows, [
        ("clients", "clients", ""), ("scenario", "scenario", ""), ("requests", "requests", ""),
        ("p50_ms", "p50 ms", ".0f"),
        ("p95_ms", "p95 ms", ".0f"), ("vs_base_pct", "p50 vs base %", "+.1f"), ("req_per_s", "req/s", ".2f"),
        ("tokens_per_s", "tokens/s", ".1f"), ("mean_tokens", "tokens/reply", ".1f"),
    ]))
    print()
    print(table(generate_rows, [
        ("scenario", "generate() only", ""), ("calls", "calls", ""), ("p50_ms", "p50 ms", ".1f"),
        ("p95_ms", "p95 ms", ".1f"), ("vs_base_pct", "p50 vs base %", "+.1f"),
    ]))
    print()
    print(table(history_rows, [
        ("size", "messages", ""), ("limit", "page size", ""), ("pages", "pages", ""), ("total_s", "page all s", ".2f"),
        ("messages_per_s", "messages/s", ".0f"), ("page_p50_ms", "page p50 ms", ".1f"),
        ("first_page_ms", "first page ms", ".1f"), ("last_page_ms", "last page ms", ".1f"),
        ("import_s", "import s", ".1f"),
    ]))
    print("bar: one adapter ≤ +15% p50 latency over base")
    return 0


if __name__ == "__main__":
    sys.exit(main())

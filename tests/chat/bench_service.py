"""Measure the chat service on the embedded small model: /v1/chat latency with and without an adapter (same run,
requests interleaved) and the time to page 10k messages out of GET /v1/history.

    .venv/bin/python tests/chat/bench_service.py [--requests 40] [--max-tokens 32] [--database-url URL]

The service runs as its own process (`python -m chat_service`), as in a pod; the client is this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx


def make_adapter(base_model: Path, root: Path, character: str, version: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_model),
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["c_attn"],
            fan_in_fan_out=True,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    directory = root / f"lora_{character}"
    model.save_pretrained(directory)
    manifest = {"schema_version": 1, "character": character, "version": version, "base_model": str(base_model),
                "prompt_template": "Instruction: {instruction}\nInput: {input}\nOutput: "}  # fmt: skip
    (directory / "manifest.json").write_text(json.dumps(manifest))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40, help="per character")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--database-url", help="default: a SQLite file in a temporary directory")
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--torch-threads", default="1", help="CHAT_TORCH_THREADS for the service (shared CPUs: 1)")
    args = parser.parse_args()

    from devkit.model import ensure_embedded_model

    base_model = ensure_embedded_model()
    work = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    make_adapter(base_model, work / "models", "lumina", "20261126T030000Z")
    env = os.environ | {
        "BASE_MODEL": str(base_model),
        "ADAPTERS_ROOT": str(work / "models"),
        "DATABASE_URL": args.database_url or f"sqlite:///{work / 'chat.db'}",
        "HISTORY_TOKEN": "bench",
        "HF_HUB_OFFLINE": "1",
        "CHAT_LOG_LEVEL": "warning",
        "CHAT_TORCH_THREADS": args.torch_threads,
    }
    command = [sys.executable, "-m", "chat_service", "--host", "127.0.0.1", "--port", str(args.port)]
    server = subprocess.Popen(command, env=env)
    base = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("service did not become ready")
            time.sleep(0.2)
        serving = {c["name"]: c["adapter_version"] for c in httpx.get(f"{base}/v1/characters").json()["characters"]}
        latencies: dict[str, list[float]] = {"lumina": [], "sora": []}
        tokens: dict[str, int] = {"lumina": 0, "sora": 0}
        with httpx.Client(base_url=base, timeout=120) as client:
            for character in latencies:  # warm-up
                client.post("/v1/chat", json={"character": character, "message": "warm up", "max_tokens": 4})
            for i in range(args.requests):
                for character in latencies:  # interleaved: both see the same machine load
                    body = {"character": character, "message": f"今日は何をしましたか？ ({i})",
                            "session_id": f"bench-{character}-{i // 5}", "max_tokens": args.max_tokens,
                            "temperature": 0}  # fmt: skip
                    started = time.perf_counter()
                    response = client.post("/v1/chat", json=body)
                    latencies[character].append(time.perf_counter() - started)
                    response.raise_for_status()
        metrics = httpx.get(f"{base}/metrics").text
        for line in metrics.splitlines():
            if line.startswith("chat_tokens_generated_total{"):
                for character in tokens:
                    if f'character="{character}"' in line:
                        tokens[character] += int(float(line.rsplit(" ", 1)[1]))
        print(
            f"model: {base_model.name}, CPUs: {os.cpu_count()}, torch threads: {args.torch_threads}, "
            f"load average: {os.getloadavg()[0]:.1f}, max_tokens={args.max_tokens}, greedy"
        )
        for character, values in latencies.items():
            print(
                f"/v1/chat {character} (serving {serving[character]}): n={len(values)} "
                f"p50={statistics.median(values) * 1000:.0f} ms p95={percentile(values, 0.95) * 1000:.0f} ms "
                f"tokens generated (incl. warm-up)={tokens[character]}"
            )

        # History: import (1000 per request) then page everything out, as the trainer does.
        auth = {"Authorization": "Bearer bench"}
        start = datetime(2026, 10, 1, tzinfo=UTC)
        with httpx.Client(base_url=base, timeout=120, headers=auth) as client:
            started = time.perf_counter()
            for offset in range(0, args.messages, 1000):
                batch = [
                    {"session_id": f"h-{(offset + i) // 6}", "character": "sora",
                     "role": "user" if (offset + i) % 2 == 0 else "assistant",
                     "content": f"メッセージ {offset + i}: 空はどうして青いの？",
                     "created_at": (start + timedelta(seconds=offset + i)).isoformat()}
                    for i in range(min(1000, args.messages - offset))
                ]  # fmt: skip
                client.post("/v1/history", json={"messages": batch}).raise_for_status()
            imported = time.perf_counter() - started
            for limit in (500, 1000):
                started = time.perf_counter()
                count, pages, cursor = 0, 0, None
                while True:
                    params = {"character": "sora", "limit": limit, "since": "2026-10-01T00:00:00Z"}
                    if cursor:
                        params["cursor"] = cursor
                    page = client.get("/v1/history", params=params).json()
                    count += len(page["messages"])
                    pages += 1
                    cursor = page["next_cursor"]
                    if cursor is None:
                        break
                seconds = time.perf_counter() - started
                print(f"GET /v1/history: {count} messages in {pages} pages of {limit}: {seconds * 1000:.0f} ms")
            print(f"POST /v1/history import of {args.messages} messages (1000/request): {imported * 1000:.0f} ms")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())

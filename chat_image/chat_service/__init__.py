"""FastAPI character chat service with durable history and per-character LoRA adapters."""

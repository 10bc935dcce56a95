"""FastAPI character chat service with durable history and per-character LoRA adapters."""

__version__ = "0.1.0"

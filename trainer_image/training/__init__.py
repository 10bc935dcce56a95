"""LoRA trainer for LlmMultiChat characters: collect, Alpaca, train, evaluate, publish."""

__version__ = "0.1.0"

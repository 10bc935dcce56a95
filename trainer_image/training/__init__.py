"""LoRA trainer for LlmMultiChat characters: collect, Alpaca, train, evaluate, publish."""

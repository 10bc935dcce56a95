"""Local harness: embedded model, sample conversations, local control plane and pod runner."""

"""Expert streaming: MoE experts read from disk into a fixed bank of slots per layer (see bank.py)."""

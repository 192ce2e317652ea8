"""Checkpoint formats behind one door: ``open.open_checkpoint(path)`` reads a Hugging Face folder (config.json +
safetensors, ``folder``) or a GGUF file (``gguf/``) as a ``checkpoint.Checkpoint``."""

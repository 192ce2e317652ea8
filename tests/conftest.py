import os

# Tests never reach the internet; the Hub client must fail fast if anything tries.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

"""The bounds every file edge-llm reads is held to, in one place.

A model file is input from strangers: its headers decide how much memory and time reading it takes.
Each bound is far above what any real checkpoint needs (the largest noted beside it) and low enough
that a hostile file is refused in milliseconds, before it can allocate or loop its way past the machine.
"""

from __future__ import annotations

# safetensors: the reference reader's own header limit (safetensors' MAX_HEADER_SIZE)
MAX_HEADER_BYTES = 100_000_000
# tensors in one checkpoint (safetensors shards together, or one GGUF file). Kimi-K2 in FP8 with
# unstacked experts: ~140k; parsing costs ~1 KB of Python objects per entry, so 512k stays ~0.5 GB.
MAX_TENSORS = 1 << 19
# dimensions of one tensor; MLX shapes are 32-bit
MAX_DIMS = 8
MAX_DIM = 2**31 - 1
# GGUF metadata: items in all its arrays together (Gemma 3's tokenizer: ~800k across tokens, scores
# and types), and arrays inside arrays (llama.cpp writes none)
MAX_METADATA_ITEMS = 1 << 22
MAX_NESTING = 4
# decoder layers a config may claim (the deepest public models have ~130)
MAX_LAYERS = 1024
# chat templates: a rendering is stopped past this time (seconds, plus 1 s per MB of conversation), past
# this many loop iterations, or when a value or its output grows past this size (plus 4x the conversation)
TEMPLATE_SECONDS = 5.0
TEMPLATE_LOOP_ITEMS = 10_000_000
TEMPLATE_OUTPUT_CHARS = 1_000_000

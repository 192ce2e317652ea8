"""GGUF files (llama.cpp, Ollama, LM Studio): the container (``reader``), its quantized types (``quants``),
llama.cpp's architecture names (``arch``), its embedded tokenizer (``tokenizer``) and the checkpoint view
of it (``checkpoint``)."""

"""Tokenizers: tokenizer.json, tokenizer.model or a GGUF vocabulary -> encode / decode / chat templates /
streaming text (``tokenizer``); the chat-template sandbox (``chat_template``), sentencepiece
(``sentencepiece_backend``) and the streaming detokenizer (``detokenizer``) behind it."""

from .tokenizer import Tokenizer, TokenizerInfo, describe_tokenizer

__all__ = ["Tokenizer", "TokenizerInfo", "describe_tokenizer"]

"""``edge-llm info MODEL``: what a checkpoint is, read from config and headers only."""

from __future__ import annotations

import json

import typer

from edge_llm.generation.sampling_defaults import SamplingSettings, model_settings
from edge_llm.hub.resolve import read_model_headers
from edge_llm.machine.memory import human_bytes
from edge_llm.modelinfo import describe
from edge_llm.tokenizer import describe_tokenizer

from .common import DEFAULT_NAME, MODEL_HELP, human_count, model_argument, model_or_default, user_errors


@user_errors
def info(
    model: str | None = model_argument(f"{MODEL_HELP}, read as config and headers only (nothing is downloaded); "
                                       f"default: the embedded {DEFAULT_NAME}."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show architecture, parameters, dtype/quantization, context length and tokenizer."""
    model, _ = model_or_default(model)
    found = read_model_headers(model)  # a Hub repo not in the cache: config and headers only, nothing pulled
    checkpoint, remote = found.checkpoint, found.remote
    m = describe(checkpoint)
    tok = describe_tokenizer(checkpoint.path) if remote is None else remote.tokenizer_info()
    facts = {
        "model": str(m.path) if remote is None else remote.where,
        "downloaded": remote is None,
        "architecture": m.architecture,
        "model_type": m.model_type,
        "params_total": m.params_total,
        "params_active": m.params_active,
        "experts": f"{m.experts[0]} of {m.experts[1]} per token" if m.experts else None,
        "layers": m.num_layers,
        "dtype": m.dtype,
        "quantization": m.quantization,
        "context_length": m.context_length,
        "size_bytes": m.size_bytes,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "chat_template": tok.chat_template,
    }
    settings = model_settings(checkpoint)
    if as_json:
        print(json.dumps({**facts, "sampling": settings.as_dict()}))
        return
    shown = dict(facts)
    shown["params_total"] = human_count(m.params_total)
    shown["params_active"] = human_count(m.params_active)
    shown["size_bytes"] = human_bytes(m.size_bytes)
    shown["quantization"] = m.quantization or "none"
    shown["downloaded"] = None if remote is None else (f"no: config and safetensors headers read from "
                                                       f"{remote.endpoint}; `edge-llm pull {remote.where}` gets it")
    for key, value in shown.items():
        if value is not None:
            print(f"{key.replace('_', ' '):>15}: {value}")
    print(f"{'sampling':>15}: {sampling_line(settings)}")


def sampling_line(settings: SamplingSettings) -> str:
    """``temperature 0.2, top_p 0.9 (model card); top_k 40 (edge-llm default)``: values grouped by source."""
    by_source: dict[str, list[str]] = {}
    for name, s in settings.settings.items():
        by_source.setdefault(s.source, []).append(f"{name} {s.value:g}")
    return "; ".join(f"{', '.join(values)} ({source})" for source, values in by_source.items())

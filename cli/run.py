"""``edge-llm run``: an interactive chat, or one answer for ``--prompt`` / piped stdin."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext

import typer

from edge_llm.backend import detect
from edge_llm.chat import ChatSession
from edge_llm.default_model import NAME as DEFAULT_NAME
from edge_llm.default_model import require_default_model
from edge_llm.loader import load
from edge_llm.sampling import SamplingParams
from quant.fit import check_fits

from .common import err, user_errors
from .repl import repl, stats_line

DEFAULTS = SamplingParams()


@user_errors
def run(
    model: str | None = typer.Argument(
        None, metavar="MODEL",
        help="Model folder, .gguf file or Hub repo id; default: the embedded SmolLM2-135M-Instruct.",
    ),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Answer this once and exit."),
    system: str | None = typer.Option(None, "--system", "-s", help="System prompt."),
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", min=1, help="Most tokens per answer."),
    temp: float = typer.Option(DEFAULTS.temperature, "--temp", min=0.0, help="Temperature; 0 is greedy."),
    top_p: float = typer.Option(DEFAULTS.top_p, "--top-p", help="Nucleus sampling mass (1 disables)."),
    top_k: int = typer.Option(DEFAULTS.top_k, "--top-k", min=0, help="Keep the k likeliest (0 disables)."),
    min_p: float = typer.Option(DEFAULTS.min_p, "--min-p", help="Drop tokens below min_p x the top one."),
    repetition_penalty: float = typer.Option(DEFAULTS.repetition_penalty, "--repetition-penalty"),
    seed: int | None = typer.Option(None, "--seed", help="Make sampling reproducible."),
    as_json: bool = typer.Option(False, "--json", help="One-shot: print one JSON object."),
    dtype: str | None = typer.Option(None, "--dtype", help="Compute dtype: float32, bfloat16, float16."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="One-shot: print stats to stderr."),
    force: bool = typer.Option(False, "--force", help="Load even if the memory estimate says it won't fit."),
) -> None:
    """Chat with MODEL (default: the embedded SmolLM2); with --prompt or piped stdin, answer once and exit."""
    name = model
    if model is None:
        model, name = str(require_default_model()), f"{DEFAULT_NAME} (default model)"
    params = SamplingParams(
        temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed,
    )
    one_shot = prompt is not None or not sys.stdin.isatty()
    if one_shot and prompt is None:
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise ValueError("no prompt: stdin was empty; pass --prompt TEXT or pipe a question")
    if not force:  # refuse before loading (or pulling) a model that cannot fit; names what would
        check_fits(model)
    with err.status(f"loading {name}", spinner="dots") if not one_shot else nullcontext():
        loaded_model, tokenizer = load(model, dtype=dtype)
    session = ChatSession(loaded_model, tokenizer, params=params, max_tokens=max_tokens, system=system)
    if not one_shot:
        repl(session, name)
        return
    answer, tokens, stats = [], [], None
    for chunk in session.ask(prompt):
        if chunk.token is not None:
            tokens.append(chunk.token)
        answer.append(chunk.text)
        stats = chunk.stats or stats
        if not as_json and chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    if as_json:
        print(json.dumps({
            "text": "".join(answer),
            "tokens": tokens,
            "prompt_tokens": stats.prompt_tokens,
            "generation_tokens": stats.generation_tokens,
            "prompt_tps": round(stats.prompt_tps, 3),
            "generation_tps": round(stats.generation_tps, 3),
            "peak_memory_bytes": stats.peak_memory_bytes,
            "finish_reason": stats.finish_reason,
            "backend": detect().name,
            "model": model,
        }))
    else:
        sys.stdout.write("\n")
        if verbose:
            err.print(stats_line(session), style="dim")

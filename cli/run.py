"""``edge-llm run``: an interactive chat, or one answer for ``--prompt`` / piped stdin (or both)."""

from __future__ import annotations

import json
import sys
import threading

import typer

from edge_llm.experts.load import expert_stats
from edge_llm.formats.open import open_checkpoint
from edge_llm.generation.chat import ChatSession
from edge_llm.generation.sampling import SEED_MAX
from edge_llm.generation.sampling_defaults import model_settings
from edge_llm.hub.resolve import resolve_model
from edge_llm.machine.backend import detect
from edge_llm.modelinfo import describe

from .common import (
    err,
    expert_policy_option,
    human_count,
    max_memory_option,
    model_argument,
    model_or_default,
    parse_dtype,
    user_errors,
)
from .model_loading import expert_slots_that_fit, follow_if_follower, launched, load_with_status, shard_option
from .prompt_input import one_shot_prompt
from .repl import ChatState, repl, sigint_sets, stats_line

FROM_MODEL = "default: the model's (`edge-llm info` shows it)"


@user_errors
def run(
    model: str | None = model_argument(),
    prompt: str | None = typer.Option(None, "--prompt", "-p", metavar="TEXT",
                                      help="Answer this once and exit; piped stdin is appended to it."),
    system: str | None = typer.Option(None, "--system", "-s", metavar="TEXT", help="System prompt."),
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", min=1, metavar="N", help="Most tokens per answer."),
    temp: float | None = typer.Option(None, "--temp", min=0.0, metavar="T",
                                      help=f"Temperature; 0 is greedy ({FROM_MODEL})."),
    top_p: float | None = typer.Option(None, "--top-p", metavar="P",
                                       help=f"Nucleus sampling: keep the likeliest tokens up to this mass; 1 disables "
                                            f"({FROM_MODEL})."),
    top_k: int | None = typer.Option(None, "--top-k", min=0, metavar="K",
                                     help=f"Keep the K likeliest tokens; 0 disables ({FROM_MODEL})."),
    min_p: float | None = typer.Option(None, "--min-p", metavar="P",
                                       help=f"Drop tokens below P x the likeliest one's probability; 0 disables "
                                            f"({FROM_MODEL})."),
    repetition_penalty: float | None = typer.Option(
        None, "--repetition-penalty", metavar="R",
        help="Penalize tokens used in the last 64 (prompt and answer): a positive logit is divided by R, a negative "
             "one multiplied (transformers' rule); above 1 discourages repetition loops, 1 disables, 1.1-1.3 is "
             f"typical ({FROM_MODEL}).",
    ),
    seed: int | None = typer.Option(None, "--seed", min=0, max=SEED_MAX, metavar="N",
                                    help="Make sampling reproducible: a whole number from 0 to 2**64 - 1."),
    as_json: bool = typer.Option(False, "--json", help="One-shot: print one JSON object."),
    dtype: str | None = typer.Option(None, "--dtype", metavar="DTYPE", parser=parse_dtype,
                                     help="Compute dtype: float32, bfloat16, float16 (default: the backend's)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="One-shot: print stats to stderr."),
    force: bool = typer.Option(False, "--force", help="Load even if the memory estimate says it won't fit."),
    context: int | None = typer.Option(None, "--context", "-c", metavar="TOKENS",
                                       help="Context window: the most tokens the chat keeps (default: the model's "
                                            "limit, at most 4096); older turns are forgotten beyond it."),
    kv_bits: int | None = typer.Option(None, "--kv-bits", metavar="8|4",
                                       help="Keep the KV cache quantized to 8 or 4 bits (3.6x or 6.4x smaller "
                                            "on the CPU; 4 bits costs small models accuracy)."),
    max_memory: int | None = max_memory_option(),
    expert_policy: str = expert_policy_option(),
    shard: str = shard_option(),
) -> None:
    """Chat with MODEL (default: the embedded SmolLM2); with --prompt or piped stdin, answer once and exit."""
    model, name = model_or_default(model)
    if follow_if_follower(model, shard, dtype):
        return
    piped = not sys.stdin.isatty() and not launched()  # mlx.launch pipes stdin to every rank and never closes it
    one_shot = prompt is not None or piped
    if as_json and not one_shot:
        raise typer.BadParameter("--json prints one answer: give --prompt TEXT or pipe the question in",
                                 param_hint="--json")
    if one_shot:
        prompt = one_shot_prompt(prompt, sys.stdin.buffer if piped else None)
    expert_slots = None if launched() else expert_slots_that_fit(model, context=context, kv_bits=kv_bits,
                                                                 max_memory=max_memory, force=force)
    checkpoint = open_checkpoint(resolve_model(model))
    settings = model_settings(checkpoint).override(
        temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
    )
    loaded_model, tokenizer = load_with_status(model, name, dtype=dtype, expert_slots=expert_slots,
                                               expert_policy=expert_policy, shard=shard)
    session = ChatSession(loaded_model, tokenizer, params=settings.params(seed), max_tokens=max_tokens, system=system,
                          context=context, kv_bits=kv_bits)
    if not one_shot:
        repl(session, ChatState(name=name, path=model, settings=settings, about=describe_line(checkpoint)))
        return
    answer_once(session, prompt, model, as_json=as_json, verbose=verbose)


def describe_line(checkpoint) -> str:
    m = describe(checkpoint)
    active = f" ({human_count(m.params_active)} active)" if m.params_active != m.params_total else ""
    return (f"{m.architecture}, {human_count(m.params_total)} parameters{active}, "
            f"{m.quantization or m.dtype}, context {m.context_length or '?'} tokens")


def _stream(session: ChatSession, prompt: str, interrupt: threading.Event, quiet: bool):
    for chunk in session.ask(prompt, interrupt=interrupt):
        if not quiet and chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        yield chunk


def answer_once(session: ChatSession, prompt: str, model: str, *, as_json: bool, verbose: bool) -> None:
    """Streams (or, with --json, collects) one answer; Ctrl-C keeps what was said and exits 130."""
    answer, tokens, stats = [], [], None
    with sigint_sets(threading.Event()) as interrupt:  # Ctrl-C ends the answer cleanly, not mid-write
        chunks = list(_stream(session, prompt, interrupt, as_json))
    for chunk in chunks:
        if chunk.token is not None:
            tokens.append(chunk.token)
        answer.append(chunk.text)
        stats = chunk.stats or stats
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
            **({"experts": experts} if (experts := expert_stats(session.model)) else {}),
        }))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        if verbose:
            err.print(stats_line(session), style="dim")
    if stats.finish_reason == "interrupted":
        err.print("interrupted")
        raise typer.Exit(130)

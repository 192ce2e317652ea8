"""``edge-llm serve``: the OpenAI-compatible HTTP API (edge_llm/serving), batched decoding, until Ctrl-C."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer

from edge_llm.formats.open import open_checkpoint
from edge_llm.generation.context import context_window
from edge_llm.generation.sampling_defaults import model_settings
from edge_llm.hub.resolve import resolve_model

from .common import (
    err,
    expert_policy_option,
    fail,
    max_memory_option,
    model_argument,
    model_or_default,
    parse_dtype,
    parse_memory_size,
    user_errors,
)
from .model_loading import expert_slots_that_fit, follow_if_follower, launched, load_with_status, shard_option
from .signals import stop_signals_interrupt

API_KEY_ENV = "EDGE_LLM_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@user_errors
def serve(
    model: str | None = model_argument(),
    host: str = typer.Option("127.0.0.1", "--host", metavar="ADDRESS",
                             help="Address to listen on; 0.0.0.0 opens the server to the network (use --api-key)."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, metavar="PORT", help="TCP port to listen on."),
    api_key: str | None = typer.Option(None, "--api-key", metavar="KEY", envvar=API_KEY_ENV, show_envvar=True,
                                       help="Require 'Authorization: Bearer KEY' on every API request."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, max=256, metavar="N",
                                  help="Requests decoded together in one batch."),
    max_queue: int = typer.Option(16, "--max-queue", min=0, max=100_000, metavar="N",
                                  help="Requests waiting for a place in the batch; beyond them the answer is 429."),
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", min=1, metavar="N",
                                   help="Most tokens per answer when a request names no max_tokens."),
    prompt_cache: int = typer.Option(8, "--prompt-cache", min=0, max=1024, metavar="N",
                                     help="KV caches of recent conversations kept, so a chat's next turn prefills "
                                          "only what is new (0: none); together they hold at most --context tokens."),
    max_body: int = typer.Option("4MiB", "--max-body", metavar="SIZE", parser=parse_memory_size,
                                 help="Largest request body accepted (413 beyond)."),
    dtype: str | None = typer.Option(None, "--dtype", metavar="DTYPE", parser=parse_dtype,
                                     help="Compute dtype: float32, bfloat16, float16 (default: the backend's)."),
    force: bool = typer.Option(False, "--force", help="Load even if the memory estimate says it won't fit."),
    context: int | None = typer.Option(None, "--context", "-c", metavar="TOKENS",
                                       help="Tokens one conversation may hold (default: the model's limit, at most "
                                            "4096); a longer prompt is refused with 400."),
    kv_bits: int | None = typer.Option(None, "--kv-bits", metavar="8|4",
                                       help="Keep the KV caches quantized to 8 or 4 bits."),
    max_memory: int | None = max_memory_option(),
    expert_policy: str = expert_policy_option(),
    shard: str = shard_option(),
) -> None:
    """Serve MODEL (default: the embedded SmolLM2) over OpenAI's HTTP API: /v1/chat/completions,
    /v1/completions, /v1/models, /health. Concurrent requests are decoded together."""
    from edge_llm.serving.app import ServedModel, build_app
    from edge_llm.serving.engine import Engine
    from edge_llm.serving.server import bind, run_server

    ref, name = model_or_default(model)
    if follow_if_follower(ref, shard, dtype):  # under mlx.launch only rank 0 listens
        return
    if not is_loopback(host):
        err.print(f"warning: listening on {host} lets other machines use this server"
                  + ("" if api_key else "; anyone who can reach it may (pass --api-key)"), style="yellow")
    try:
        sock = bind(host, port)  # before loading: a taken port is said at once
    except OSError as e:
        raise fail(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host") from None
    expert_slots = None if launched() else expert_slots_that_fit(ref, context=context, kv_bits=kv_bits,
                                                                 max_memory=max_memory, force=force)
    settings = model_settings(open_checkpoint(resolve_model(ref)))
    loaded, tokenizer = load_with_status(ref, name, dtype=dtype, expert_slots=expert_slots,
                                         expert_policy=expert_policy, shard=shard)
    served_id = name.removesuffix(" (default model)") if model is None else model
    served = ServedModel(id=served_id, aliases=frozenset({ref, Path(ref).name, Path(ref).stem}), settings=settings,
                         context=context_window(loaded.context_length, context), default_max_tokens=max_tokens)
    engine = Engine(loaded, tokenizer, kv_bits=kv_bits, max_batch=max_batch, max_queue=max_queue,
                    prompt_cache=prompt_cache, prompt_cache_tokens=served.context)
    app = build_app(engine, tokenizer, served, api_key=api_key or None, max_body=max_body)
    shown = f"[{host}]" if ":" in host else host
    keyed = ", API key required" if api_key else ""
    err.print(f"serving {served_id} at http://{shown}:{sock.getsockname()[1]}/v1 (batch {max_batch}, queue "
              f"{max_queue}, context {served.context}{keyed}); Ctrl-C stops", soft_wrap=True)
    engine.start()
    try:
        with stop_signals_interrupt():  # uvicorn hands SIGINT/SIGTERM back once it has stopped: exit 0 then
            run_server(app, sock, on_stop=lambda: engine.stop(timeout=0))
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop(timeout=60)  # lets a step in progress end (a long prefill chunk of a large model)
        sock.close()
    err.print("stopped")



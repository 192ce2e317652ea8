"""``edge-llm bench MODEL``: speed and memory of one model on this machine."""

from __future__ import annotations

import json

import typer

from edge_llm.bench import PROMPT_LENGTHS, run_bench
from edge_llm.machine.memory import human_bytes
from quant.fit import check_fits

from .common import (
    err,
    expert_line,
    expert_policy_option,
    max_memory_option,
    model_argument,
    model_or_default,
    parse_dtype,
    parse_prompt_lengths,
    user_errors,
)
from .model_loading import follow_if_follower, launched, prepare_cpu_kernels, shard_option


@user_errors
def bench(
    model: str | None = model_argument(),
    decode_tokens: int = typer.Option(64, "--decode-tokens", min=1, metavar="N",
                                      help="Tokens to decode for the decode speed."),
    prompt_lengths: str = typer.Option(",".join(map(str, PROMPT_LENGTHS)), "--prompt-lengths", metavar="N,N,...",
                                       help="Prompt lengths in tokens for prefill speed (those that do not fit the "
                                            "model's context are skipped)."),
    dtype: str | None = typer.Option(None, "--dtype", metavar="DTYPE", parser=parse_dtype,
                                     help="Compute dtype: float32, bfloat16, float16 (default: the backend's)."),
    context: int | None = typer.Option(None, "--context", "-c", metavar="TOKENS",
                                       help="Context window: prompt lengths plus decoded tokens beyond it are "
                                            "skipped (default: the model's limit)."),
    kv_bits: int | None = typer.Option(None, "--kv-bits", metavar="8|4", help="Keep the KV cache quantized."),
    max_memory: int | None = max_memory_option(),
    expert_policy: str = expert_policy_option(),
    force: bool = typer.Option(False, "--force", help="Load even if the memory estimate says it won't fit."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    shard: str = shard_option(),
) -> None:
    """Measure load time, time to first token, prefill and decode tok/s, peak memory and bandwidth use."""
    lengths = parse_prompt_lengths(prompt_lengths)
    model, name = model_or_default(model)
    if follow_if_follower(model, shard, dtype):
        return
    slots = None
    if not force and not launched():  # as `run` does: refuse what cannot fit, stream a MoE's experts when only it fits
        plan = check_fits(model, context=context, kv_bits=kv_bits, max_memory=max_memory)
        slots = plan.expert_slots
        if slots or max_memory is not None:
            err.print(plan.describe(), style="dim", soft_wrap=True)
    prepare_cpu_kernels()  # not timed as part of loading
    with err.status(f"benchmarking {name}", spinner="dots"):
        r = run_bench(model, lengths, decode_tokens, dtype, context=context, kv_bits=kv_bits, expert_slots=slots,
                      expert_policy=expert_policy, shard=shard if launched() else None)
    if as_json:
        print(json.dumps(r.to_dict()))
        return
    print(f"model            {name} ({r.backend})")
    print(f"load             {r.load_s:.2f} s")
    print(f"first token      {r.time_to_first_token_s * 1000:.0f} ms ({min(r.prefill_tps)}-token prompt)")
    for n, tps in r.prefill_tps.items():
        print(f"prefill {n:>5}    {tps:.1f} tok/s")
    print(f"decode           {r.decode_tps:.2f} tok/s ({r.decode_tokens} tokens)")
    print(f"peak memory      {human_bytes(r.peak_memory_bytes)}")
    print(f"bandwidth        {human_bytes(r.achieved_bytes_per_s)}/s of {human_bytes(r.bandwidth_bytes_per_s)}/s "
          f"measured = {r.bandwidth_fraction:.0%} ({human_bytes(r.active_weight_bytes)} read per token)")
    if r.experts:
        print(f"experts          {expert_line(r.experts)} (decode)")

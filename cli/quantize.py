"""``edge-llm quantize MODEL -o OUT --bits 4``: 4/8-bit MLX affine, or FP16/BF16, with progress and a summary."""

from __future__ import annotations

import json

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from quant.quality import Quality, evaluate
from quant.quantize import QuantizeResult, quantize

from .common import err, human_bytes, user_errors


class RichProgress:
    """Tensors and bytes written, on stderr (a plain line per update when it is not a terminal)."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TextColumn("{task.fields[tensors]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=err, transient=True,
        )
        self.task = None
        self.done = self.total = 0

    def start(self, tensors: int, nbytes: int) -> None:
        self.total = tensors
        self.bar.start()
        self.task = self.bar.add_task("quantizing", total=nbytes, tensors=f"0/{tensors} tensors")

    def advance(self, name: str, nbytes: int) -> None:
        self.done += 1
        self.bar.update(self.task, advance=nbytes, tensors=f"{self.done}/{self.total} tensors")

    def stop(self) -> None:
        self.bar.stop()


def _summary(r: QuantizeResult) -> str:
    return (f"[bold green]done:[/] {r.out} ({r.recipe}): {human_bytes(r.source_bytes)} -> "
            f"{human_bytes(r.output_bytes)}, {r.bits_per_weight:.2f} bits per weight, {r.tensors} tensors in "
            f"{r.shards} shard{'s' if r.shards > 1 else ''}, {r.seconds:.1f} s, peak memory "
            f"{human_bytes(r.peak_memory_bytes)}")


def _quality_line(q: Quality) -> str:
    return (f"quality on {q.tokens} tokens of built-in text: KL divergence {q.kl_mean:.4f} nats/token "
            f"(max {q.kl_max:.3f}), perplexity {q.ppl_source:.2f} -> {q.ppl_quantized:.2f}, "
            f"top-1 agreement {q.top1_agreement:.1%}")


@user_errors
def quantize_cmd(
    model: str = typer.Argument(..., metavar="MODEL",
                                help="Model folder, Hub repo id or GGUF file (float, FP8, or llama.cpp-quantized)."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (must not exist unless --force)."),
    bits: int | None = typer.Option(None, "--bits", "-b", help="4 (default) or 8 (also 2, 3, 5, 6); 16 converts "
                                    "to float16/bfloat16. A quantized GGUF keeps its own bits unless given."),
    group_size: int | None = typer.Option(None, "--group-size", "-g", help="Weights per scale and offset: 32, 64 "
                                          "(default) or 128; 32 for a quantized GGUF."),
    dtype: str | None = typer.Option(None, "--dtype", help="float16 or bfloat16 for unquantized tensors and scales."),
    recipe: str | None = typer.Option(None, "--recipe", help="uniform, mixed_3_6, mixed_4_6, ... or rules "
                                      "like 'lm_head=8,*.v_proj=6' (glob over module paths = bits or float)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (only once the new one is done)."),
    eval_quality: bool = typer.Option(False, "--eval", help="Report KL divergence and perplexity vs the source."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Quantize MODEL to 4/8-bit (MLX affine format, error-minimising scales) or convert it to FP16/BF16."""
    progress = RichProgress()
    try:
        result = quantize(model, out, bits=bits, group_size=group_size, dtype=dtype, recipe=recipe, force=force,
                          progress=progress)
    except KeyboardInterrupt:
        progress.stop()  # before printing, so the line is not drawn over
        err.print(f"interrupted: nothing was written to {out}")
        raise typer.Exit(130) from None
    finally:
        progress.stop()
    quality = None
    if eval_quality:
        with err.status("evaluating against the source", spinner="dots"):
            quality = evaluate(result.source, result.out)
    if as_json:
        data = {"source": str(result.source), "out": str(result.out), "recipe": result.recipe,
                "source_bytes": result.source_bytes, "output_bytes": result.output_bytes,
                "bits_per_weight": round(result.bits_per_weight, 4), "params": result.params,
                "tensors": result.tensors, "shards": result.shards, "seconds": round(result.seconds, 3),
                "peak_memory_bytes": result.peak_memory_bytes}
        if quality is not None:
            data.update(kl_divergence=quality.kl_mean, kl_max=quality.kl_max, perplexity_source=quality.ppl_source,
                        perplexity_quantized=quality.ppl_quantized, top1_agreement=quality.top1_agreement,
                        eval_tokens=quality.tokens)
        print(json.dumps(data))
        return
    err.print(_summary(result), markup=True, soft_wrap=True)
    if quality is not None:
        err.print(_quality_line(quality), soft_wrap=True)

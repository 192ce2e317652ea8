"""``edge-llm quantize MODEL -o OUT --bits 4``: 4/8-bit MLX affine, or FP16/BF16, with progress and a summary."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from edge_llm.formats.open import open_checkpoint
from edge_llm.machine.memory import human_bytes
from quant.calibrate import MIN_EXPERT_TOKENS, Calibration
from quant.quality import Quality, Verdict, evaluate, judge
from quant.quantize import QuantizeJob, QuantizeResult, quantize

from .common import err, parse_half_dtype, parse_model_ref, user_errors
from .signals import Stopped, exit_code, stop_signals_interrupt


class RichProgress:
    """Tensors and bytes written, and the speed (tensors/s, GB/s of source weights), as a bar on stderr when it is
    a terminal; nothing otherwise (the announcement and the summary say what a log needs, and a bar's redraws
    would only litter it)."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TextColumn("{task.fields[tensors]}"), TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
            TimeRemainingColumn(), console=err, transient=True,
        ) if err.is_terminal else None
        self.task = None
        self.done = self.total = self.written = self.nbytes = self.source_bytes = 0
        self.started = 0.0

    def announce(self, job: QuantizeJob) -> None:
        self.source_bytes = job.source_bytes
        announce(job)

    def start(self, tensors: int, nbytes: int) -> None:
        self.total, self.nbytes, self.started = tensors, nbytes, time.perf_counter()
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("quantizing", total=nbytes, tensors=f"0/{tensors} tensors", speed="")

    def speed(self) -> str:
        """Tensors per second and source GB per second so far (the source read in proportion to the output
        written)."""
        seconds = max(time.perf_counter() - self.started, 1e-9)
        read = self.written / self.nbytes * self.source_bytes if self.nbytes else 0
        return f"{self.done / seconds:.1f} tensors/s, {read / seconds / 1e9:.2f} GB/s"

    def advance(self, name: str, nbytes: int) -> None:
        self.done += 1
        self.written += nbytes
        if self.bar is not None:
            self.bar.update(self.task, advance=nbytes, tensors=f"{self.done}/{self.total} tensors", speed=self.speed())

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def announce(job: QuantizeJob) -> None:
    """What is about to happen, before the first tensor is written."""
    err.print(f"quantizing {job.source} -> {job.out}: {job.recipe}, float tensors {job.float_dtype}; "
              f"{job.tensors} tensors, {human_bytes(job.source_bytes)} -> about {human_bytes(job.output_bytes)}",
              highlight=False, soft_wrap=True, markup=False)


def _identity(out: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(Path(out).expanduser())
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _say_stopped(stop: KeyboardInterrupt, out: str, before: tuple[int, int] | None) -> None:
    """One line on how the conversion ended: a stop signal arriving while the finished output is swapped in
    is held until the swap is done, so OUT may be complete (a new folder stands there)."""
    how = f"stopped by {stop.name}" if isinstance(stop, Stopped) else "interrupted"
    done = _identity(out) not in (None, before)
    try:
        err.print(f"{how} after {out} was complete" if done else f"{how}: nothing was written to {out}",
                  highlight=False, soft_wrap=True, markup=False)
    except OSError:  # SIGHUP: the terminal may be gone
        pass


def _summary(r: QuantizeResult) -> str:
    return (f"[bold green]done:[/] {r.out} ({r.recipe}): {human_bytes(r.source_bytes)} -> "
            f"{human_bytes(r.output_bytes)}, {r.bits_per_weight:.2f} bits per weight, {r.tensors} tensors in "
            f"{r.shards} shard{'s' if r.shards > 1 else ''}, {r.seconds:.1f} s, peak memory "
            f"{human_bytes(r.peak_memory_bytes)}")


def _calibration_line(c: Calibration) -> str:
    text = "the built-in text" if c.text == "built-in" else c.text
    line = f"calibrated ({c.method.upper()}) on {c.tokens} tokens of {text}"
    experts = c.experts_calibrated + c.experts_fallback
    if experts:
        line += (f"; routed experts: {c.experts_calibrated} of {experts} on their own tokens, {c.experts_fallback} saw "
                 f"fewer than {MIN_EXPERT_TOKENS} and were quantized without calibration")
    return line


def _quality_line(q: Quality) -> str:
    return (f"quality on {q.tokens} tokens of built-in text: KL divergence {q.kl_mean:.4f} nats/token "
            f"(max {q.kl_max:.3f}), perplexity {q.ppl_source:.2f} -> {q.ppl_quantized:.2f}, "
            f"top-1 agreement {q.top1_agreement:.1%}")


def _either(options: tuple[str, ...]) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def _verdict_line(v: Verdict) -> str:
    better = f"; for better quality try {_either(v.suggestions)}" if v.suggestions else ""
    return f"[bold yellow]warning:[/] poor quality ({'; '.join(v.reasons)}): answers may be wrong{better}"


@user_errors
def quantize_cmd(
    model: str = typer.Argument(..., metavar="MODEL", show_default=False, parser=parse_model_ref,
                                help="Model folder (float or FP8 safetensors), .gguf file (float, or llama.cpp-"
                                     "quantized: Q4_0, Q4_1, Q5_*, Q8_0, K-quants) or Hub repo id (owner/name)."),
    out: str = typer.Option(..., "--out", "-o", metavar="DIR", show_default=False,
                            help="Output folder (must not exist unless --force)."),
    bits: int | None = typer.Option(None, "--bits", "-b", metavar="BITS",
                                    help="4 (default) or 8 (also 2, 3, 5, 6); 16 converts to float16/bfloat16. "
                                         "A quantized GGUF keeps its own bits unless given."),
    group_size: int | None = typer.Option(None, "--group-size", "-g", metavar="N",
                                          help="Weights per scale and offset: 32, 64 (default) or 128; 32 for a "
                                               "quantized GGUF."),
    dtype: str | None = typer.Option(None, "--dtype", metavar="DTYPE", parser=parse_half_dtype,
                                     help="float16 or bfloat16 for unquantized tensors and scales."),
    recipe: str | None = typer.Option(None, "--recipe", metavar="RECIPE",
                                      help="uniform, mixed_3_6, mixed_4_6, ... or rules like 'lm_head=8,*.v_proj=6' "
                                           "(glob over module paths = bits or float)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (only once the new one is done)."),
    eval_quality: bool = typer.Option(False, "--eval", help="Report KL divergence, perplexity and top-1 agreement "
                                      "vs the source, with a warning when the result is poor."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Round with GPTQ on the model's activations over a "
                                   "built-in public-domain text (slower; lower error at the same size)."),
    calibration_text: str | None = typer.Option(None, "--calibration-text", metavar="TEXT_FILE",
                                                help="Calibrate on this UTF-8 text file instead (implies "
                                                     "--calibrate)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Quantize MODEL to 4/8-bit (MLX affine format, error-minimising scales) or convert it to FP16/BF16."""
    progress = RichProgress()
    before = _identity(out)
    try:
        with stop_signals_interrupt():
            result = quantize(model, out, bits=bits, group_size=group_size, dtype=dtype, recipe=recipe,
                              force=force, progress=progress, announce=progress.announce,
                              calibrate=calibrate if calibration_text is None else calibration_text)
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP
        progress.stop()  # before printing, so the line is not drawn over
        _say_stopped(stop, out, before)
        raise typer.Exit(exit_code(stop)) from None
    finally:
        progress.stop()
    quality = verdict = None
    if eval_quality:
        with err.status("evaluating against the source", spinner="dots"):
            quality = evaluate(result.source, result.out)
        verdict = judge(quality, open_checkpoint(result.out).quantization, calibrated=result.calibration is not None)
    if as_json:
        data = {"source": str(result.source), "out": str(result.out), "recipe": result.recipe,
                "source_bytes": result.source_bytes, "output_bytes": result.output_bytes,
                "bits_per_weight": round(result.bits_per_weight, 4), "params": result.params,
                "tensors": result.tensors, "shards": result.shards, "seconds": round(result.seconds, 3),
                "peak_memory_bytes": result.peak_memory_bytes}
        if result.calibration is not None:
            data["calibration"] = result.calibration.as_config()
        if quality is not None:
            data.update(kl_divergence=quality.kl_mean, kl_max=quality.kl_max, perplexity_source=quality.ppl_source,
                        perplexity_quantized=quality.ppl_quantized, top1_agreement=quality.top1_agreement,
                        eval_tokens=quality.tokens, verdict=verdict.as_dict())
        print(json.dumps(data))
        if verdict is not None and verdict.poor:  # stdout carries the JSON; the warning still reaches a person
            err.print(_verdict_line(verdict), soft_wrap=True, highlight=False)
        return
    err.print(_summary(result), markup=True, soft_wrap=True)
    if result.calibration is not None:
        err.print(_calibration_line(result.calibration), soft_wrap=True, highlight=False, markup=False)
    if quality is not None:
        err.print(_quality_line(quality), soft_wrap=True)
        if verdict.poor:
            err.print(_verdict_line(verdict), soft_wrap=True, highlight=False)

"""Decode speed against the context: how a step's time grows with the tokens already in the cache.

For each context length: a fresh cache, a prompt of that many tokens (ids spread over the vocabulary; the text does
not matter to the speed), a few warm-up steps, then --steps greedy steps timed one after another (in-process,
``model(token, cache)`` then the argmax read back, as ``generate_tokens`` runs on the CPU). Prints ms a step and
tok/s per context. Run it from another checkout (``PYTHONPATH=CHECKOUT``) for a before/after in one sitting.

    python -m benchmarks.context_decode [MODEL] [--contexts 100,1000,2000,4000] [--steps 30]
"""

from __future__ import annotations

import argparse
import time


def step_times(model_path: str | None, contexts: list[int], steps: int) -> dict[int, float]:
    """Seconds a decode step takes after each context length."""
    import mlx.core as mx

    import edge_llm
    from edge_llm.default_model import require_default_model
    from edge_llm.generation.generate import prefill

    model, _ = edge_llm.load(model_path or require_default_model())
    vocab = model.args.vocab_size
    out = {}
    for context in contexts:
        cache = model.make_cache()
        ids = [(i * 7919) % (vocab - 100) + 100 for i in range(context)]
        prefill(model, ids, cache)
        token = mx.array([ids[-1]])
        for _ in range(3):
            token = mx.argmax(model(token[None], cache=cache)[:, -1, :], axis=-1)
            token.item()
        start = time.perf_counter()
        for _ in range(steps):
            token = mx.argmax(model(token[None], cache=cache)[:, -1, :], axis=-1)
            token.item()
        out[context] = (time.perf_counter() - start) / steps
    return out


def positive_ints(value: str) -> list[int]:
    """``N[,N...]`` of positive integers (argparse type: anything else is a one-line usage error)."""
    try:
        numbers = [int(item) for item in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of whole numbers") from None
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: every number must be at least 1")
    return numbers


def positive_int(value: str) -> int:
    numbers = positive_ints(value)
    if len(numbers) != 1:
        raise argparse.ArgumentTypeError(f"{value!r}: one number")
    return numbers[0]


def main() -> None:
    from edge_llm.errors import EdgeLLMError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a model path or file (default: the embedded SmolLM2)")
    parser.add_argument("--contexts", type=positive_ints, default=[100, 1000, 2000, 4000],
                        help="context lengths, comma-separated (default 100,1000,2000,4000)")
    parser.add_argument("--steps", type=positive_int, default=30, help="timed decode steps per context")
    args = parser.parse_args()
    try:
        times = step_times(args.model, args.contexts, args.steps)
    except EdgeLLMError as error:
        parser.exit(2, f"context_decode: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "context_decode: interrupted\n")
    print("| context | ms a step | tok/s |\n|---|---|---|")
    for context, seconds in times.items():
        print(f"| {context} | {seconds * 1e3:.2f} | {1 / seconds:.1f} |")


if __name__ == "__main__":
    main()

"""How often the embedded default answers everyday questions right and stops by itself, per sampling setting.

    python -m benchmarks.sampling_defaults                      # the settings `edge-llm run` uses, 10 seeds
    python -m benchmarks.sampling_defaults --seeds 10 --config '{"temperature": 0.2, "top_p": 0.9}' ...

An answer counts when generation ended by itself (EOS, not the token limit) and it contains one of the
question's expected words. Fields a --config leaves out come from the model's defaults, so each config is
what a user gets with those flags. Prints one markdown row per setting (paste into RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import time

from edge_llm.default_model import require_default_model
from edge_llm.formats.open import open_checkpoint
from edge_llm.generation.chat import ChatSession
from edge_llm.generation.sampling_defaults import model_settings
from edge_llm.loader import load

QUESTIONS = {
    "What is the capital of France?": ("paris",),
    "How many days are there in a week?": ("seven", "7"),
    "What is the boiling point of water at sea level in Celsius?": ("100",),
    "How many legs does a spider have?": ("eight", "8"),
    "What color is the sky on a clear day?": ("blue",),
    "What is 2 + 2?": ("4", "four"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--config", action="append", default=[], help="JSON sampling flags; repeatable")
    args = parser.parse_args()
    path = require_default_model()
    model, tokenizer = load(path)
    defaults = model_settings(open_checkpoint(path))
    configs = [json.loads(c) for c in args.config] or [{}]
    print("| setting | " + " | ".join(QUESTIONS) + " |")
    print("|---" * (len(QUESTIONS) + 1) + "|")
    for config in configs:
        settings = defaults.override(**config)
        start, cells = time.time(), []
        for question, words in QUESTIONS.items():
            good = 0
            for seed in range(args.seeds):
                session = ChatSession(model, tokenizer, params=settings.params(seed), max_tokens=args.max_tokens)
                answer = "".join(chunk.text for chunk in session.ask(question)).lower()
                good += session.last.generation.finish_reason == "stop" and any(w in answer for w in words)
            cells.append(f"{good}/{args.seeds}")
        label = ", ".join(f"{k} {s.value:g}" for k, s in settings.settings.items())
        print(f"| {label} | " + " | ".join(cells) + f" |  <!-- {time.time() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()

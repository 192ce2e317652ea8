"""The estimate predicts the peak resident memory of a real ``edge-llm run`` within 10%.

Each run is a fresh ``edge-llm run MODEL --prompt P --json`` process; its peak RSS is the kernel's
high-water mark of that process alone (``wait4``, benchmarks/harness.py). The estimate is asked for the
same model at the context the run reached. Models: SmolLM2-135M quantized to 4-bit by ``quantize``, and
a 0.45B MoE (DeepSeek-V2-Lite shape: MLA, 32 routed experts + a shared one) in the same 4-bit format.
benchmarks/estimate_calibration.py measures more models and contexts and records the errors; both build
their models and runs with tests/memory_runs.py.
"""

from __future__ import annotations

import pytest

from quant.quantize import quantize
from tests.backend import cpu_only
from tests.memory_runs import MOE_SHAPES, build_random_quantized, run_and_estimate

pytestmark = [pytest.mark.slow, cpu_only("the runtime overhead is calibrated against peak RSS on the CPU")]
TOLERANCE = 0.10


def check(model, prompt_tokens: int) -> None:
    r = run_and_estimate(model, prompt_tokens, max_tokens=4)
    error = r["estimate"] / r["rss"] - 1
    assert abs(error) <= TOLERANCE, (f"{model.name} at {r['context']} tokens: estimate {r['estimate'] / 1e6:.1f} MB, "
                                     f"measured {r['rss'] / 1e6:.1f} MB ({error:+.1%})")


@pytest.mark.parametrize("prompt_tokens", [40, 300])
def test_smollm2_4bit(smollm2_folder, tmp_path_factory, prompt_tokens):
    out = tmp_path_factory.getbasetemp() / "smollm2-4bit"
    if not (out / "config.json").is_file():
        quantize(smollm2_folder, out, bits=4, group_size=64)
    check(out, prompt_tokens)


@pytest.mark.parametrize("prompt_tokens", [20, 300])
def test_moe_4bit(tmp_path_factory, prompt_tokens):
    out = tmp_path_factory.getbasetemp() / "moe-4bit"
    if not (out / "config.json").is_file():
        build_random_quantized(out, MOE_SHAPES["deepseek-v2-lite-shaped"])
    check(out, prompt_tokens)

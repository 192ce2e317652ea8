"""edge-llm's CPU kernels (edge_llm/kernels) against MLX's own ops, which decide what is right.

Quantized products equal ``x @ mx.dequantize(...).T`` in float32 (MLX's quantized_matmul computes exactly
that; only the summation order may differ) for every bits x group size, each scale dtype, odd shapes; the
gathered forms equal mx.gather_qmm / mx.gather_mm for the shapes SwitchGLU uses. A row's result is the same
bits whatever rows, runs and threads share its call. Switched off or unbuildable, the pure-MLX path answers;
greedy answers are the same tokens with the kernels on and off.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from edge_llm.kernels import extension, ops
from tests.tiny_configs import TINY_CONFIGS

REPO_ROOT = Path(__file__).resolve().parent.parent
RTOL = 1e-5  # relative to the largest |reference|: summation order only
UNIT_ROUNDOFF = {mx.float32: 0.0, mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}  # one rounding of a result to it
FLOATS = tuple(UNIT_ROUNDOFF)
ROWS = (1, 3, 5, 9)  # 9: two full blocks of 4 rows and a single one


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the kernel switches, plus ``extra``: for child processes."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGE_LLM_CPU_")} | {"NO_COLOR": "1"} | extra


def child(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """``python ARGS`` from the repository root with ``env`` over a clean environment; asserts it succeeded."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=clean_env(**env), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _expected_here() -> bool:
    return platform.system() == "Linux" and platform.machine() == "x86_64" and shutil.which("gcc") is not None


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The loaded kernel module. Where they can be built (Linux x86-64 with gcc), inactive kernels fail."""
    module = extension.load()
    state = extension.status()
    if not state.active:
        if extension.switched_off():
            pytest.skip(state.detail)  # switched off on purpose by whoever runs the suite
        if _expected_here():
            pytest.fail(f"CPU kernels inactive on Linux x86-64 with gcc: {state.detail}")
        pytest.skip(state.detail)
    return module


def normal(shape, seed: int, dtype=mx.float32) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def quantized(shape, bits: int, group_size: int, scale_dtype=mx.float32, seed: int = 0):
    w, s, b = mx.quantize(normal(shape, seed), group_size=group_size, bits=bits)
    return w, s.astype(scale_dtype), b.astype(scale_dtype)


def dequantized(w, s, b, group_size: int, bits: int) -> mx.array:
    """The float32 weights MLX's quantized ops multiply by (scales upcast first: exact)."""
    return mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)


def assert_close(got: mx.array, want: mx.array, what: str = "") -> None:
    """``got`` equals the float32 ``want`` up to summation order, plus one rounding to ``got``'s dtype."""
    unit = UNIT_ROUNDOFF[got.dtype]
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert got.shape == want.shape, what
    scale = max(float(np.abs(want).max()), 1e-6)
    error = np.abs(got - want)
    assert (error <= RTOL * scale + unit * np.abs(want)).all(), \
        f"{what}: error {error.max() / scale:.3g} of max |ref| {scale:.3g}"


# --- a. quantized products against the dequantized reference ---------------------------------------------------

CASES = [(bits, gs) for bits in ops.BITS for gs in ops.GROUP_SIZES]


@pytest.mark.skipif(not ops.active(), reason="the CPU kernels are not active here")
@pytest.mark.parametrize("bits,group_size", CASES, ids=[f"{b}bit-g{g}" for b, g in CASES])
def test_a_quantized_tables_rows_are_mlxs_lookup_bit_for_bit(bits, group_size):
    """``ops.dequantized_rows`` (a quantized embedding's lookup, float32 scales as the CPU keeps them) equals
    ``mx.dequantize(w[ids], ...)`` exactly; an id past the table gives NaN, never another row's bytes."""
    w, s, b = quantized((41, group_size * 3), bits, group_size, mx.float32, seed=bits)
    for ids in (mx.array([[5]]), mx.array([[0, 40, 7], [7, 3, 3]], dtype=mx.int32)):
        want = mx.dequantize(w[ids], s[ids], b[ids], group_size=group_size, bits=bits)
        got = ops.dequantized_rows(ids, w, s, b, group_size, bits)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.array_equal(np.array(got), np.array(want))
    assert np.isnan(np.array(ops.dequantized_rows(mx.array([41]), w, s, b, group_size, bits))).all()
    assert ops.dequantized_rows(mx.array([1]), w, s.astype(mx.float16), b.astype(mx.float16), group_size,
                                bits) is None  # half-precision scales: MLX's own lookup


@pytest.mark.parametrize("bits,group_size", CASES, ids=[f"{b}bit-g{g}" for b, g in CASES])
def test_quantized_product_is_the_dequantized_product(bits, group_size):
    case = CASES.index((bits, group_size))
    for i, scale_dtype in enumerate(FLOATS):
        for j, (x_dtype, n) in enumerate([(mx.float32, 37), (mx.bfloat16, 37), (mx.float32, 1)]):
            k = group_size * (3, 5, 1)[(case + j) % 3]  # K: the group size times an odd count
            rows = ROWS[(case + 3 * i + j) % len(ROWS)]
            w, s, b = quantized((n, k), bits, group_size, scale_dtype, seed=case)
            x = normal((rows, k), seed=100 + j, dtype=x_dtype)
            reference = x.astype(mx.float32) @ dequantized(w, s, b, group_size, bits).T
            mlx = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group_size, bits=bits)
            ours = ops.quantized_matmul(x, w, s, b, group_size, bits)
            what = f"{bits}-bit g{group_size} scales {scale_dtype} x {x_dtype} [{rows}, {k}] -> {n}"
            if mlx.dtype == mx.float32:  # MLX's all-bf16 product rounds as it goes (5e-2 off): no reference
                assert_close(mlx, reference, "MLX " + what)
            assert_close(ours, reference, what)


def test_non_contiguous_inputs_give_the_same_bits():
    w, s, b = quantized((37, 128), 4, 32, mx.bfloat16)
    x = normal((128, 5), seed=1).T  # a transposed view: the primitive copies it into rows
    assert mx.array_equal(ops.quantized_matmul(x, w, s, b, 32, 4),
                          ops.quantized_matmul(mx.contiguous(x), w, s, b, 32, 4)).item()
    wide = normal((37, 2 * 100), seed=2, dtype=mx.bfloat16)[:, ::2]  # every other column: a strided weight
    xf = normal((3, 100), seed=3)
    assert mx.array_equal(ops.float_matmul(xf, wide), ops.float_matmul(xf, mx.contiguous(wide))).item()


# Which output dtype: MLX promotes x with the scales (bf16 x, f16 scales -> float32).
DTYPE_PAIRS = [(x, s) for x in FLOATS for s in FLOATS]


@pytest.mark.parametrize("x_dtype,scale_dtype", DTYPE_PAIRS,
                         ids=[f"x-{x}-scales-{s}".replace("mlx.core.", "") for x, s in DTYPE_PAIRS])
def test_output_dtype_is_mlxs(x_dtype, scale_dtype):
    w, s, b = quantized((37, 64), 4, 32, scale_dtype)
    x = normal((3, 64), seed=1, dtype=x_dtype)
    mlx = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=32, bits=4)
    assert ops.quantized_matmul(x, w, s, b, 32, 4).dtype == mlx.dtype


# --- b. gathered experts, as SwitchGLU calls them --------------------------------------------------------------

DECODE_IDS = mx.array([[3, 0], [1, 1], [2, 4], [0, 3], [4, 2]], dtype=mx.uint32)  # [T, k], unsorted
SORTED_IDS = mx.array([0, 0, 0, 2, 3, 3, 4], dtype=mx.uint32)  # [P]: runs of equal ids
EXPERTS = 5


@pytest.mark.parametrize("bits,group_size,scale_dtype", [(4, 64, mx.bfloat16), (8, 32, mx.float16),
                                                         (3, 128, mx.float32), (6, 32, mx.bfloat16)])
def test_gathered_quantized_experts_are_gather_qmm(bits, group_size, scale_dtype):
    k = group_size * 3
    w, s, b = quantized((EXPERTS, 37, k), bits, group_size, scale_dtype)
    decode = normal((DECODE_IDS.shape[0], 1, 1, k), seed=1)
    runs = normal((SORTED_IDS.shape[0], 1, k), seed=2)
    for x, ids, is_sorted in ((decode, DECODE_IDS, False), (runs, SORTED_IDS, True)):
        mlx = mx.gather_qmm(x, w, s, b, rhs_indices=ids, transpose=True, group_size=group_size, bits=bits,
                            sorted_indices=is_sorted)
        ours = ops.gather_quantized_matmul(x, w, s, b, ids, group_size, bits, sorted_indices=is_sorted)
        assert ours.shape == mlx.shape and ours.dtype == mlx.dtype
        assert_close(ours, mlx, f"{bits}-bit experts, ids {ids.shape}")


@pytest.mark.parametrize("dtype", FLOATS)
def test_gathered_float_experts_are_gather_mm(dtype):
    w = normal((EXPERTS, 37, 100), seed=0, dtype=dtype)  # K = 100: not a multiple of 32 (a scalar tail)
    w32 = w.astype(mx.float32).swapaxes(-1, -2)
    decode = normal((DECODE_IDS.shape[0], 1, 1, 100), seed=1)
    runs = normal((SORTED_IDS.shape[0], 1, 100), seed=2)
    for x, ids, is_sorted in ((decode, DECODE_IDS, False), (runs, SORTED_IDS, True)):
        mlx = mx.gather_mm(x, w32, rhs_indices=ids, sorted_indices=is_sorted)
        ours = ops.gather_float_matmul(x, w, ids)
        assert ours.shape == mlx.shape and ours.dtype == mx.float32
        assert_close(ours, mlx, f"{dtype} experts, ids {ids.shape}")
    x = normal((5, 100), seed=3)
    assert_close(ops.float_matmul(x, w[1]), x @ w32[1], f"{dtype} weight")


# --- c. a row's result does not depend on its company -----------------------------------------------------------

def weights_and_rows():
    """The products the bit-for-bit checks compare across processes: inputs from fixed seeds."""
    x = normal((9, 384), seed=11)
    q4 = quantized((301, 384), 4, 32, mx.bfloat16, seed=12)  # 301: a decoded row comes in tiles of four rows of
    q3 = quantized((300, 384), 3, 128, mx.float16, seed=13)  # weights, and one alone
    q8 = quantized((303, 384), 8, 64, mx.float16, seed=15)
    half = normal((300, 100), seed=14, dtype=mx.bfloat16)
    return x, q4, q3, q8, half


def products() -> dict[str, np.ndarray]:
    x, q4, q3, q8, half = weights_and_rows()
    out = {"q4": ops.quantized_matmul(x, *q4, 32, 4), "q3": ops.quantized_matmul(x, *q3, 128, 3),
           "q8": ops.quantized_matmul(x, *q8, 64, 8), "half": ops.float_matmul(x[:, :100], half)}
    mx.eval(out)
    return {name: np.array(v) for name, v in out.items()}


def products_in_subprocess(tmp_path: Path, env: dict[str, str]) -> tuple[dict[str, np.ndarray], dict]:
    out = tmp_path / f"products-{len(list(tmp_path.iterdir()))}.npz"
    script = ("import json, numpy as np\nfrom tests.test_cpu_kernels import products\n"
              "from edge_llm.kernels import extension\n"
              "m = extension.load(); s = extension.status()\n"
              f"np.savez({str(out)!r}, **products())\n"
              "print(json.dumps({'active': s.active, 'detail': s.detail, 'isa': m.isa(), 'threads': m.threads()}))\n")
    facts = json.loads(child(["-c", script], **env).stdout.strip().splitlines()[-1])
    assert facts["active"], facts["detail"]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}, facts


def test_a_row_is_the_same_bits_alone_or_among_others():
    x, q4, q3, q8, half = weights_and_rows()
    xh = x[:, :100]
    for name, f, rows in (("4-bit", lambda r: ops.quantized_matmul(r, *q4, 32, 4), x),
                          ("3-bit", lambda r: ops.quantized_matmul(r, *q3, 128, 3), x),
                          ("8-bit", lambda r: ops.quantized_matmul(r, *q8, 64, 8), x),
                          ("bf16", lambda r: ops.float_matmul(r, half), xh)):
        together = f(rows)
        for r in range(rows.shape[0]):
            assert mx.array_equal(f(rows[r : r + 1]), together[r : r + 1]).item(), f"{name} row {r}"
            if r < 3:  # among other rows in a different block of 4
                mixed = f(mx.concatenate([rows[r : r + 1], rows[5:8]]))
                assert mx.array_equal(mixed[0], together[r]).item(), f"{name} row {r} with rows 5-7"


def test_a_row_is_the_same_bits_in_a_sorted_run():
    w, s, b = quantized((EXPERTS, 64, 192), 4, 64, mx.bfloat16)
    half = normal((EXPERTS, 64, 100), seed=5, dtype=mx.float16)
    ids = mx.array([1, 1, 1, 1, 1, 2, 2, 4, 0], dtype=mx.uint32)  # a run of 5: a block of 4 and a single row
    x = normal((9, 1, 192), seed=6)
    quant_runs = ops.gather_quantized_matmul(x, w, s, b, ids, 64, 4, sorted_indices=True)
    half_runs = ops.gather_float_matmul(x[..., :100], half, ids)
    for r, e in enumerate(ids.tolist()):
        alone = ops.quantized_matmul(x[r], w[e], s[e], b[e], 64, 4)
        assert mx.array_equal(quant_runs[r], alone).item(), f"4-bit row {r} (expert {e})"
        assert mx.array_equal(half_runs[r], ops.float_matmul(x[r, :, :100], half[e])).item(), f"f16 row {r}"


def test_threads_do_not_change_the_bits_and_the_portable_kernels_agree(tmp_path):
    here = products()
    one, facts_one = products_in_subprocess(tmp_path, {"EDGE_LLM_CPU_THREADS": "1"})
    two, facts_two = products_in_subprocess(tmp_path, {"EDGE_LLM_CPU_THREADS": "2"})
    assert (facts_one["threads"], facts_two["threads"]) == (1, 2)
    for name in here:
        assert np.array_equal(one[name], two[name]), f"{name}: 1 thread vs 2"
        assert np.array_equal(one[name], here[name]), f"{name}: 1 thread vs this process"
    x, q4, q3, q8, half = weights_and_rows()
    references = {"q4": x @ dequantized(*q4, 32, 4).T, "q3": x @ dequantized(*q3, 128, 3).T,
                  "q8": x @ dequantized(*q8, 64, 8).T,
                  "half": x[:, :100] @ half.astype(mx.float32).T}
    # every lesser instruction set this CPU can run (AVX-512 machines pick it first, AVX2 ones AVX2)
    lesser = ["generic"] + (["avx2+fma+f16c"] if facts_one["isa"] == "avx512" else [])
    for isa in lesser:
        got, facts = products_in_subprocess(tmp_path, {"EDGE_LLM_CPU_ISA": isa.split("+")[0]})
        assert facts["isa"] == isa and isa in facts["detail"]
        for name, reference in references.items():
            assert_close(mx.array(got[name]), reference, f"{isa} {name}")


def test_thread_and_isa_settings_outside_their_range_are_noted(monkeypatch):
    module = extension.load()
    before = module.threads()
    try:
        for value, note in (("abc", "ignored"), ("0", "ignored"), ("100000", "capped at the")):
            monkeypatch.setenv(extension.THREADS_ENV, value)
            notes = extension.configure(module)
            assert module.threads() == extension.usable_cores(), value
            assert len(notes) == 1 and note in notes[0] and value in notes[0], notes
        monkeypatch.setenv(extension.THREADS_ENV, "1")
        monkeypatch.setenv(extension.ISA_ENV, "bogus")
        notes = extension.configure(module)
        assert module.threads() == 1 and len(notes) == 1 and "'bogus' ignored" in notes[0], notes
    finally:
        module.set_threads(before)


# --- d. inside mx.compile ---------------------------------------------------------------------------------------

def test_compiled_function_gives_the_same_result():
    w, s, b = quantized((37, 256), 5, 64, mx.float16)
    x = normal((3, 256), seed=1)

    def step(x, w, s, b):
        return mx.tanh(ops.quantized_matmul(x * 2, w, s, b, 64, 5)) + 1

    assert mx.array_equal(mx.compile(step)(x, w, s, b), step(x, w, s, b)).item()


# --- e. the pure-MLX path where the kernels are off or cannot be built ------------------------------------------

def test_switched_off_the_kernels_leave_mlxs_result():
    script = ("import json, mlx.core as mx\nfrom edge_llm.kernels import status, ops\n"
              "w, s, b = mx.quantize(mx.random.normal((37, 128), key=mx.random.key(0)), group_size=32, bits=4)\n"
              "x = mx.random.normal((3, 128), key=mx.random.key(1))\n"
              "same = mx.array_equal(ops.quantized_matmul(x, w, s, b, 32, 4),\n"
              "                      mx.quantized_matmul(x, w, s, b, group_size=32, bits=4)).item()\n"
              "st = status(build_if_missing=True)\n"
              "print(json.dumps({'active': st.active, 'detail': st.detail, 'same': same, "
              "'half': ops.float_matmul(x, w.astype(mx.bfloat16)) is None}))\n")
    facts = json.loads(child(["-c", script], EDGE_LLM_CPU_KERNELS="0").stdout)
    assert not facts["active"] and "EDGE_LLM_CPU_KERNELS" in facts["detail"], facts
    assert facts["same"] and facts["half"], facts


@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory) -> Path:
    from quant.quantize import quantize
    from tests.hf_oracle import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-q4")
    src = build_tiny_checkpoint(root / "src", seed=1, with_tokenizer=True, **TINY_CONFIGS["llama"])
    quantize(src, root / "q4", bits=4)
    return root / "q4"


def test_without_a_compiler_status_says_so_and_run_still_answers(tmp_path, tiny_quantized):
    env = {"EDGE_LLM_HOME": str(tmp_path / "home"), "CC": "/nonexistent/cc"}
    script = ("import json\nfrom edge_llm.kernels import status\n"
              "st = status(build_if_missing=True)\nprint(json.dumps({'active': st.active, 'detail': st.detail}))\n")
    facts = json.loads(child(["-c", script], **env).stdout)
    assert not facts["active"] and "\n" not in facts["detail"], facts
    assert "compiler" in facts["detail"] and "/nonexistent/cc" in facts["detail"], facts
    run = child(["-m", "cli.main", "run", str(tiny_quantized), "--prompt", "Hello!", "--temp", "0", "--max-tokens",
                 "6", "--json"], **env)
    assert json.loads(run.stdout)["generation_tokens"] > 0


# --- f. end to end: the same greedy tokens with the kernels on and off ------------------------------------------

def greedy(model: list[str], prompt: str, kernels_on: bool, max_tokens: int = 24) -> list[int]:
    args = ["run", *model, "--prompt", prompt, "--temp", "0", "--max-tokens", str(max_tokens), "--json"]
    if kernels_on:  # this process: the kernels are loaded and active (the module fixture)
        from typer.testing import CliRunner

        from cli.main import app

        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["tokens"]
    return json.loads(child(["-m", "cli.main", *args], EDGE_LLM_CPU_KERNELS="0").stdout)["tokens"]


def assert_same_tokens(on: list[int], off: list[int]) -> None:
    first = next((i for i, (a, b) in enumerate(zip(on, off, strict=False)) if a != b), None)
    assert on == off, f"kernels on/off differ first at token {first if first is not None else min(len(on), len(off))}"


def test_smollm2_greedy_tokens_unchanged():
    prompt = "Tell me about the history of Rome."  # 24 tokens before any end of turn
    on, off = greedy([], prompt, True), greedy([], prompt, False)
    assert len(on) == 24
    assert_same_tokens(on, off)


@pytest.fixture(scope="module")
def tiny_moes(tmp_path_factory) -> dict[str, Path]:
    """A 4-bit qwen3_moe (gather_qmm experts) and a bfloat16 mixtral (gather_mm experts), with a tokenizer."""
    from quant.quantize import quantize
    from tests.hf_oracle import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("moe")
    qwen = build_tiny_checkpoint(root / "qwen3_moe", seed=1, with_tokenizer=True, **TINY_CONFIGS["qwen3_moe"])
    mixtral = build_tiny_checkpoint(root / "mixtral", seed=1, with_tokenizer=True, **TINY_CONFIGS["mixtral"])
    quantize(qwen, root / "qwen3_moe-4bit", bits=4)
    quantize(mixtral, root / "mixtral-bf16", bits=16, dtype="bfloat16")
    return {"4bit": root / "qwen3_moe-4bit", "bf16": root / "mixtral-bf16"}


@pytest.mark.parametrize("kind", ["4bit", "bf16"])
def test_moe_greedy_tokens_unchanged(tiny_moes, kind):
    prompt = "Hello! How are you today?"
    on, off = greedy([str(tiny_moes[kind])], prompt, True), greedy([str(tiny_moes[kind])], prompt, False)
    assert len(on) >= 8, on  # an answer long enough to compare
    assert_same_tokens(on, off)

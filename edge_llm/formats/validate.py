"""A checkpoint's config checked against itself and against its weights, before anything is built.

``check_checkpoint`` runs when a checkpoint is read (``folder.read_folder``, ``gguf.checkpoint.read_gguf_checkpoint``),
so ``info``, ``estimate``, ``run`` and ``quantize`` all refuse the same bad files with the same one line:

- every field the architecture reads, typed and in range (``ModelArgs.from_dict``: ``models/fields.py``),
  and the combinations its ``__post_init__`` requires;
- the fields read outside the architecture (``architectures``, the dtype, expert counts) and the MLX
  ``quantization`` block (group size, bits and mode MLX has kernels for, per-module entries);
- the model's size: a lower bound of its parameter count, from the config alone, against the bytes the
  weight files hold. A config claiming a billion layers, or a vocabulary of 10^12, over a 100 MB file is
  refused in microseconds, before a module or an array exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..models import get_architecture
from ..models.fields import Rule, checked
from .tensors import DTYPE_BYTES

if TYPE_CHECKING:
    from ..models.base import BaseModelArgs
    from .checkpoint import Checkpoint

QUANT_BITS = (1, 2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (16, 32, 64, 128)
QUANT_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
# keys of the quantization block that are settings, not module paths
_QUANT_SETTINGS = {"group_size", "bits", "mode", "quant_method"}

# fields read outside the architectures (modelinfo, the estimator)
GENERAL_RULES: dict[str, Rule] = {
    "architectures": Rule(list, optional=True, items=Rule(str)),
    "torch_dtype": Rule(str, optional=True),
    "dtype": Rule(str, optional=True),
    "num_experts_per_tok": Rule(int, 1, 2**31 - 1, optional=True),
    "n_routed_experts": Rule(int, 0, 2**31 - 1, optional=True),
    "num_local_experts": Rule(int, 0, 2**31 - 1, optional=True),
    "num_experts": Rule(int, 0, 2**31 - 1, optional=True),
}


def check_checkpoint(checkpoint: Checkpoint) -> None:
    """Raises CheckpointError (one line: the file, the field, what was expected) for a config that its
    architecture cannot build or that its weights cannot hold."""
    where = checkpoint.config_path
    config = checkpoint.config
    try:
        for name, rule in GENERAL_RULES.items():
            if name in config:
                checked(name, config[name], rule)
        check_quantization(config.get("quantization"))
        args = get_architecture(config["model_type"]).ModelArgs.from_dict(config)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if checkpoint.tensors:
        check_dtypes(checkpoint)
        check_size(checkpoint, args)


# what a model parameter may be stored as: floats, DeepSeek's FP8 (fp8.py), MLX's packed 4/8-bit codes
PARAMETER_DTYPES = ("F32", "F16", "BF16", "F8_E4M3")
_PARAMETER_SUFFIXES = (".weight", ".bias", ".scales", ".biases", "_scale_inv", ".e_score_correction_bias")


def check_dtypes(checkpoint: Checkpoint) -> None:
    """Every parameter in a dtype the loader (and the estimator) reads: a float, FP8, or the uint32 codes
    of a module the quantization block quantizes (a ``.weight`` with its ``.scales``). Integer formats of
    other quantizers (GPTQ, AWQ, bitsandbytes) and an integer where a float belongs are refused by name."""
    quantized = bool(checkpoint.quantization)
    for name, info in checkpoint.tensors.items():
        if info.dtype in PARAMETER_DTYPES or not name.endswith(_PARAMETER_SUFFIXES):
            continue
        module = name.rsplit(".", 1)[0]
        if info.dtype == "U32" and quantized and name.endswith(".weight") and f"{module}.scales" in checkpoint.tensors \
                and len(info.shape) >= 2:  # MLX quantizes matrices (and stacks of them), never vectors
            continue
        raise CheckpointError(
            f"{info.file}: tensor {name[:80]!r} is stored as {info.dtype}; edge-llm reads weights as "
            f"F32, F16, BF16, FP8 (E4M3) or MLX-quantized U32 codes (with a quantization block in config.json)"
        )


def check_quantization(block: Any) -> None:
    """The MLX community quantization block: ``{"group_size", "bits", "mode"?, "<module>": {...} | false}``."""
    if block is None:
        return
    if not isinstance(block, dict):
        raise ValueError(f"config field 'quantization': {block!r:.40} is not an object; expected "
                         '{"group_size": 64, "bits": 4, ...}')
    _check_settings("quantization", block)
    for key, value in block.items():
        if key in _QUANT_SETTINGS:
            continue
        if isinstance(value, dict):
            _check_settings(f"quantization.{key}", value)
        elif not isinstance(value, bool):
            raise ValueError(f"config field 'quantization.{key}': {value!r:.40} is neither settings nor false")


def _check_settings(name: str, settings: dict[str, Any]) -> None:
    for key, allowed in (("group_size", QUANT_GROUP_SIZES), ("bits", QUANT_BITS)):
        if key not in settings:
            raise ValueError(f"config field '{name}' lacks {key!r}")
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
            raise ValueError(f"config field '{name}.{key}': {value!r:.40} is not one of "
                             f"{', '.join(map(str, allowed))}")
    mode = settings.get("mode", "affine")
    if mode not in QUANT_MODES:
        raise ValueError(f"config field '{name}.mode': {mode!r:.40} is not one of {', '.join(QUANT_MODES)}")


def min_parameters(args: BaseModelArgs) -> int:
    """A lower bound of the parameters every architecture builds for ``args``: the embedding (and output
    head when untied) plus, per layer, its attention projections and the smallest feed-forward block any
    layer kind has (a dense MLP, or one routed expert)."""
    h, experts = args.hidden_size, args.expert_counts()
    ffn = 3 * h * min(args.intermediate_size, experts.intermediate_size if experts else args.intermediate_size)
    embeddings = args.vocab_size * h * (1 if args.tie_word_embeddings else 2)
    return embeddings + args.num_hidden_layers * (args.attention_parameters() + ffn + 2 * h) + h


def _least_bits(checkpoint: Checkpoint) -> int:
    """The fewest bits any parameter of the checkpoint is stored in."""
    bits = [8 * DTYPE_BYTES[t.dtype] for t in checkpoint.tensors.values() if t.dtype not in ("U32", "BOOL")]
    q = checkpoint.quantization or {}
    bits += [q["bits"]] if q else []
    bits += [v["bits"] for v in q.values() if isinstance(v, dict)]
    return max(1, min(bits, default=1))


def check_size(checkpoint: Checkpoint, args: BaseModelArgs) -> None:
    """Refuses a config describing a model larger than its weight files can hold. Only a gross mismatch
    (twice the bytes) is refused here: a missing tensor or two is the loader's to name exactly."""
    params = min_parameters(args)
    bits = _least_bits(checkpoint)
    needed, present = params * bits // 8, checkpoint.nbytes
    if needed > 2 * present:
        fields = (f"vocab_size {args.vocab_size}, hidden_size {args.hidden_size}, intermediate_size "
                  f"{args.intermediate_size}, num_hidden_layers {args.num_hidden_layers}, num_attention_heads "
                  f"{args.num_attention_heads}")
        raise CheckpointError(
            f"{checkpoint.config_path}: the config describes at least {params:.3g} parameters ({fields}), "
            f"{needed:,} bytes at {bits} bits each, but the weights hold {present:,} bytes; "
            f"the config does not belong to these weights (re-download or fix it)"
        )

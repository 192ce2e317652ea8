"""Types and ranges of every config field an architecture reads, checked before a ``ModelArgs`` exists.

A config.json is input from strangers: ``num_hidden_layers: 1e9`` must be refused before a list of a
billion layers is built, ``hidden_size: 0`` before it divides anything. ``BaseModelArgs.from_dict``
checks each field it is given against ``RULES`` (tests/test_hostile_config.py checks that every field of
every architecture has a rule) and raises ``ValueError`` naming the field, the value and what is expected.
Combinations of fields (heads dividing hidden size, ...) stay in each ``ModelArgs.__post_init__``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..limits import MAX_DIM, MAX_LAYERS
from .layers import ACTIVATIONS
from .rope import SUPPORTED_ROPE_TYPES


@dataclass(frozen=True)
class Rule:
    kind: type  # int, float, bool, str, dict or list
    low: float | None = None  # inclusive bounds
    high: float | None = None
    optional: bool = False  # null is accepted (the architecture's default applies)
    above: float | None = None  # exclusive lower bound, for floats that must be positive
    even: bool = False
    choices: tuple[str, ...] = ()
    items: Rule | None = None  # list items


SIZE = Rule(int, 1, MAX_DIM)
COUNT = Rule(int, 0, MAX_DIM)
FLAG = Rule(bool)
POSITIVE = Rule(float, above=0)

RULES: dict[str, Rule] = {
    "vocab_size": SIZE,
    "hidden_size": SIZE,
    "intermediate_size": SIZE,
    "num_hidden_layers": Rule(int, 1, MAX_LAYERS),
    "num_attention_heads": SIZE,
    "num_key_value_heads": Rule(int, 1, MAX_DIM, optional=True),
    "head_dim": Rule(int, 2, MAX_DIM, optional=True, even=True),  # rotary pairs
    "hidden_act": Rule(str, choices=tuple(ACTIVATIONS)),
    "rms_norm_eps": Rule(float, above=0, high=1),
    "max_position_embeddings": SIZE,
    "rope_theta": Rule(float, above=1),  # the base of the rotary wavelengths: 1 or less makes them all equal
    "rope_scaling": Rule(dict, optional=True),
    "attention_bias": FLAG,
    "mlp_bias": FLAG,
    "qkv_bias": FLAG,
    "tie_word_embeddings": FLAG,
    "norm_topk_prob": FLAG,
    "use_sliding_window": FLAG,
    "rope_interleave": FLAG,
    "sliding_window": Rule(int, 0, MAX_DIM, optional=True),  # 0 where it is used: models/base.check_window
    "max_window_layers": COUNT,
    "layer_types": Rule(list, optional=True, items=Rule(str, choices=("full_attention", "sliding_attention"))),
    "num_local_experts": Rule(int, 0, MAX_DIM, optional=True),
    "num_experts": Rule(int, 0, MAX_DIM, optional=True),
    "num_experts_per_tok": Rule(int, 1, MAX_DIM, optional=True),
    "moe_intermediate_size": SIZE,
    "shared_expert_intermediate_size": SIZE,
    "decoder_sparse_step": Rule(int, 1, MAX_LAYERS),
    "mlp_only_layers": Rule(list, optional=True, items=Rule(int, 0, MAX_LAYERS)),
    "clip_qkv": Rule(float, above=0, optional=True),
    "n_routed_experts": Rule(int, 0, MAX_DIM, optional=True),
    "n_shared_experts": Rule(int, 0, MAX_DIM, optional=True),
    "topk_method": Rule(str),
    "n_group": Rule(int, 1, MAX_DIM, optional=True),
    "topk_group": Rule(int, 1, MAX_DIM, optional=True),
    "routed_scaling_factor": POSITIVE,
    "first_k_dense_replace": Rule(int, 0, MAX_LAYERS),
    "moe_layer_freq": Rule(int, 1, MAX_LAYERS),
    "kv_lora_rank": SIZE,
    "q_lora_rank": Rule(int, 1, MAX_DIM, optional=True),
    "qk_nope_head_dim": COUNT,
    "qk_rope_head_dim": Rule(int, 2, MAX_DIM, even=True),
    "v_head_dim": SIZE,
    "quantization": Rule(dict, optional=True),  # its contents: edge_llm.formats.validate.check_quantization
}

# rope_scaling's own keys (transformers' rope_config_validation), for the types it supports
ROPE_RULES: dict[str, Rule] = {
    "rope_type": Rule(str, choices=SUPPORTED_ROPE_TYPES),
    "type": Rule(str, choices=SUPPORTED_ROPE_TYPES),
    "factor": Rule(float, above=0, optional=True),
    "original_max_position_embeddings": Rule(int, 1, MAX_DIM, optional=True),
    "low_freq_factor": Rule(float, above=0, optional=True),
    "high_freq_factor": Rule(float, above=0, optional=True),
    "attention_factor": Rule(float, above=0, optional=True),
    "beta_fast": Rule(float, above=0, optional=True),
    "beta_slow": Rule(float, above=0, optional=True),
    "mscale": Rule(float, low=0, optional=True),
    "mscale_all_dim": Rule(float, low=0, optional=True),
    "truncate": Rule(bool, optional=True),
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def checked(name: str, value: Any, rule: Rule) -> Any:
    """``value`` if it obeys ``rule`` (an integral float becomes an int); ValueError naming ``name`` if not."""
    if value is None:
        if rule.optional:
            return None
        raise ValueError(f"config field {name!r}: is null, expected {_expected(rule)}")
    value = _typed(name, value, rule)
    if rule.kind in (int, float):
        if rule.low is not None and value < rule.low or rule.high is not None and value > rule.high \
                or rule.above is not None and value <= rule.above:
            raise ValueError(f"config field {name!r}: {_shown(value)} is out of range, expected {_expected(rule)}")
        if rule.even and value % 2:
            raise ValueError(f"config field {name!r}: {value} must be even (rotary embeddings rotate pairs)")
    if rule.choices and value not in rule.choices:
        raise ValueError(f"config field {name!r}: {_shown(value)} is not supported (supported: "
                         f"{', '.join(rule.choices)})")
    if rule.items is not None:
        value = [checked(f"{name}[{i}]", item, rule.items) for i, item in enumerate(value)]
    return value


_JSON_KINDS = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "an object"}


def _typed(name: str, value: Any, rule: Rule) -> Any:
    kind = rule.kind
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if kind is int and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value, ok = int(value), True  # 4096.0 is 4096; 1e9 layers is then refused by its range
    if kind is float and ok and not math.isfinite(value):
        raise ValueError(f"config field {name!r}: {value} is not a finite number")
    if not ok:
        raise ValueError(f"config field {name!r}: {_shown(value)} is {_JSON_KINDS.get(type(value), 'an object')}, "
                         f"expected {_expected(rule)}")
    return value


def _number(x: float) -> str:
    return "2^31-1" if x == MAX_DIM else str(int(x)) if float(x).is_integer() else f"{x:g}"


def _expected(rule: Rule) -> str:
    what = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
            list: "a list"}[rule.kind]
    if rule.low is not None and rule.high is not None:
        what += f" from {_number(rule.low)} to {_number(rule.high)}"
    elif rule.low is not None:
        what += f" of at least {_number(rule.low)}"
    if rule.above is not None:
        what += f" above {_number(rule.above)}" + (f" and at most {_number(rule.high)}" if rule.high else "")
    return what + (" (or null)" if rule.optional else "")


def check_fields(config: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """The values of ``fields`` (name -> has a default) found in ``config``, each checked against its
    rule; a field without a default must be present. Unknown fields are the caller's to ignore."""
    out = {}
    for name, has_default in fields.items():
        if name not in config:
            if not has_default:
                raise ValueError(f"config field {name!r} is missing")
            continue
        rule = RULES.get(name)
        out[name] = config[name] if rule is None else checked(name, config[name], rule)
    scaling = out.get("rope_scaling")
    if isinstance(scaling, dict):
        out["rope_scaling"] = {k: checked(f"rope_scaling.{k}", v, ROPE_RULES[k]) if k in ROPE_RULES else v
                               for k, v in scaling.items()}  # fmt: skip
        _check_rope_combination(out["rope_scaling"])
    return out


def _check_rope_combination(scaling: dict[str, Any]) -> None:
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind in ("linear", "dynamic", "llama3") and scaling.get("factor") is None:
        raise ValueError(f"config field 'rope_scaling.factor': {kind} rope scaling needs a factor")
    if kind == "llama3" and scaling.get("low_freq_factor", 1.0) >= scaling.get("high_freq_factor", 4.0):
        raise ValueError("config field 'rope_scaling.high_freq_factor': must be above low_freq_factor")

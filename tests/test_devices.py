"""Which device runs a model, resident or streamed, and how fast at best: against figures worked by hand.

Shapes from the published config.json files (tests/test_estimate.py); bytes at MLX affine 4-bit g64 with
bf16 scales and offsets: 4 + 2 * 16 / 64 = 4.5 bits per weight = 0.5625 bytes; routers 8-bit (8.5 bits).
Device figures from the makers' specifications (quant/devices.py cites them).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from quant.devices import DEVICES, GB, GIB, Device, metal_working_set, select_devices, this_machine
from quant.estimate import config_only
from quant.memory import policy_for
from quant.placement import Footprint, footprint_from_plan, place
from quant.plan import plan_quantized, source_dtype_of
from quant.recipes import make_recipe
from tests.test_estimate import DEEPSEEK_V3, MIXTRAL_8X7B

Q4 = 0.5625


def device(name: str) -> Device:
    (found,) = [d for d in DEVICES if d.name == name]
    return found


# --- Mixtral-8x7B 4-bit, by hand ---
# one expert: gate, up, down = 3 x 4096 x 14336 weights                              = 176,160,768 weights
MIXTRAL_EXPERT = 3 * 4096 * 14336 * 9 // 16  # x 0.5625                              = 99,090,432 B
# resident: attention 32 x (2 x 4096^2 + 2 x 4096 x 1024) x 0.5625                  = 754,974,720
#           routers 32 x 8 x 4096 x 8.5/8                                            = 1,114,112
#           norms (2 x 32 + 1) x 4096 x 2 B                                          = 532,480
#           embedding + lm_head 2 x 32000 x 4096 x 0.5625                            = 147,456,000
MIXTRAL_RESIDENT = 754_974_720 + 1_114_112 + 532_480 + 147_456_000  # = 904,077,312
MIXTRAL_KV = 2 * 32 * 8 * 128 * 2 * 4096  # K and V, 32 layers, 8 heads x 128, bf16, 4096 tokens = 536,870,912
# one decode step reads: the resident part less the embedding table plus one of its rows (4096 x 0.5625),
# 2 experts x 32 layers, the KV cache
MIXTRAL_READ = MIXTRAL_RESIDENT - 73_728_000 + 2304 + 2 * 32 * MIXTRAL_EXPERT + MIXTRAL_KV  # = 7,709,010,176


def mixtral(overhead: int = 400_000_000) -> Footprint:
    return Footprint(MIXTRAL_RESIDENT, MIXTRAL_EXPERT, 32, 8, 2, MIXTRAL_KV, overhead, MIXTRAL_READ)


def test_mixtral_4bit_on_a_16gb_m2_streams_and_is_disk_bound():
    m2 = device("Apple M2 16GB")
    assert (m2.usable_bytes, m2.bandwidth, m2.disk_bandwidth) == (11_453_246_122, 100e9, 3e9)  # 2/3 of 16 GiB
    p = place(mixtral(), m2)
    # fixed: 904,077,312 + 536,870,912 + 400,000,000 = 1,840,948,224, + 4 reads in flight of one expert, raw and
    # decoded (4 x 2 x 99,090,432 = 792,723,456); headroom min(10%, 256 MiB) = 268,435,456; left 8,551,138,986;
    # one slot in all 32 layers: 3,170,893,824 -> 2 slots (6,341,787,648); 3 would need 9.51 GB
    assert (p.mode, p.bank_slots, p.bank_bytes) == ("streamed", 2, 6_341_787_648)
    assert p.needed_bytes == 8_975_459_328 <= m2.usable_bytes
    assert p.hit_rate == 2 / 8
    # misses per token: 2 experts x 32 layers x 99,090,432 x 6/8 = 4,756,340,736 B; at 3 GB/s: 0.631 tok/s
    assert p.disk_bytes_per_token == 4_756_340_736
    assert p.disk_tps == pytest.approx(0.6307, abs=1e-4)
    assert p.memory_tps == pytest.approx(12.972, abs=1e-3)  # 100 GB/s / 7,709,010,176 B
    assert p.tps == p.disk_tps


def test_mixtral_4bit_is_resident_on_a_64gb_m4_max():
    p = place(mixtral(), device("Apple M4 Max 40-core GPU 64GB"))
    # whole: 1,840,948,224 + 8 x 3,170,893,824 = 27,208,098,816 <= 3/4 of 64 GiB = 51,539,607,552
    assert (p.mode, p.needed_bytes, p.hit_rate, p.disk_tps) == ("resident", 27_208_098_816, 1.0, None)
    assert p.tps == pytest.approx(546e9 / 7_709_010_176)  # 70.8 tok/s


def test_mixtral_needs_more_than_an_8gb_m1_has_and_says_how_much():
    m1 = device("Apple M1 8GB")
    p = place(mixtral(), m1)
    # least that streams: 1,840,948,224 + 792,723,456 (reads) + 2 slots x 3,170,893,824 = 8,975,459,328
    # > 2/3 of 8 GiB (5,726,623,061)
    assert (p.mode, p.needed_bytes, p.tps) == ("no", 8_975_459_328, None)


# --- DeepSeek-V3 4-bit (671B, 37B active) ---
# one routed expert: 3 x 7168 x 2048 x 0.5625 = 24,772,608 B; 58 MoE layers (61 less 3 dense), 256 experts, top 8
V3_EXPERT = 3 * 7168 * 2048 * 9 // 16
# resident: 671.0B parameters less 58 x 256 x 3 x 7168 x 2048 = 653.9B routed = 17.1B at ~4.5 bits: ~9.6 GB
# KV (MLA latent): 61 layers x (512 + 64) x 2 B x 4096 tokens = 287,834,112
V3_KV = 61 * 576 * 2 * 4096


def deepseek_v3() -> Footprint:
    return Footprint(9_600_000_000, V3_EXPERT, 58, 256, 8, V3_KV, 1_500_000_000, 21_000_000_000)


def test_deepseek_v3_4bit_on_a_192gb_m2_ultra_streams():
    ultra = device("Apple M2 Ultra 192GB")
    assert ultra.usable_bytes == 154_618_822_656  # 3/4 of 192 GiB
    p = place(deepseek_v3(), ultra)
    # fixed 11,387,834,112; left 143,230,988,544; a slot in 58 layers: 1,436,811,264 -> 99 slots
    assert (p.mode, p.bank_slots) == ("streamed", 99)
    assert p.hit_rate == 99 / 256
    # misses: 8 x 58 x 24,772,608 x 157/256 = 7,049,355,264 B per token; at 5 GB/s: 0.709 tok/s
    assert p.disk_bytes_per_token == 7_049_355_264
    assert p.tps == pytest.approx(0.70929, abs=1e-5)
    assert p.memory_tps == pytest.approx(800 / 21)  # 38 tok/s if every expert were in memory


def test_deepseek_v3_on_a_16gb_machine_is_refused_with_the_least_budget():
    p = place(deepseek_v3(), device("Apple M4 16GB"))
    # 11,387,834,112 + 4 x 2 x 24,772,608 (reads in flight, raw and decoded) + 8 x 1,436,811,264 = 23,080,505,088
    assert (p.mode, p.needed_bytes) == ("no", 23_080_505_088)


def test_deepseek_v3_is_resident_only_on_a_512gb_m3_ultra():
    whole = deepseek_v3().whole_bytes  # 11.4 GB + 256 x 1.44 GB = 379 GB
    assert whole == 11_387_834_112 + 256 * 1_436_811_264
    resident = [d.name for d in DEVICES if place(deepseek_v3(), d).mode == "resident"]
    assert resident == ["Apple M3 Ultra 512GB"]  # 3/4 of 512 GiB = 412 GB; an H200 has 141 GiB


# --- a dense 7B on an H100 ---

def test_llama2_7b_4bit_on_an_h100_is_resident():
    # 32 x (4 x 4096^2 + 3 x 4096 x 11008) = 6,476,005,376 weights x 0.5625 = 3,642,753,024
    # + embedding and lm_head 2 x 32000 x 4096 x 0.5625 = 147,456,000 + norms 65 x 4096 x 2 = 532,480
    resident = 3_642_753_024 + 147_456_000 + 532_480
    kv = 2 * 32 * 32 * 128 * 2 * 4096  # fp16, 4096 tokens: 2,147,483,648
    read = resident - 73_728_000 + 2304 + kv
    dense = Footprint(resident, 0, 0, 0, 0, kv, 500_000_000, read)
    p = place(dense, device("NVIDIA H100 SXM 80GB"))
    assert (p.mode, p.needed_bytes) == ("resident", 6_438_225_152)
    assert p.tps == pytest.approx(3.35e12 / 5_864_499_456)  # 571 tok/s
    small = place(dense, device("NVIDIA GeForce RTX 3060 12GB"))
    assert small.mode == "resident"
    # a dense model never streams: too big is "no", needing the whole
    assert place(dense, device("Apple M1 8GB")).mode == "no"
    assert place(dense, device("Apple M1 8GB")).needed_bytes == dense.whole_bytes


def test_an_unknown_disk_speed_promises_no_streamed_speed():
    unknown = Device("this machine", "this", "ram", 16 * GIB, 12 * GIB, 20e9, None)
    p = place(mixtral(), unknown)
    assert (p.mode, p.disk_tps, p.tps) == ("streamed", None, None)
    assert p.as_dict()["decode_tokens_per_s_ceiling"] is None


# --- the footprint the estimator's plan gives ---

def test_footprint_of_the_planned_mixtral_matches_the_hand_figures():
    ck = config_only(MIXTRAL_8X7B, "mixtral")
    from edge_llm.loader import build_model

    model = build_model(ck)
    plan = plan_quantized(model, make_recipe(4, 64), "BF16", source_dtype_of(ck))
    itemsize = policy_for("metal", plan).itemsize
    f = footprint_from_plan(plan, itemsize, MIXTRAL_KV, 400_000_000, plan.bytes_per_token(itemsize) + MIXTRAL_KV)
    assert f == replace(mixtral(), routed_bytes=32 * 8 * MIXTRAL_EXPERT)  # on a GPU a bank holds experts as stored
    assert f.resident_bytes + 32 * 8 * MIXTRAL_EXPERT == plan.memory_bytes(itemsize)


def test_footprint_of_the_planned_deepseek_v3_splits_58_moe_layers():
    ck = config_only(DEEPSEEK_V3, "deepseek_v3")
    from edge_llm.loader import build_model

    plan = plan_quantized(build_model(ck), make_recipe(4, 64), "BF16", source_dtype_of(ck))
    itemsize = policy_for("metal", plan).itemsize
    f = footprint_from_plan(plan, itemsize, V3_KV, 0, plan.bytes_per_token(itemsize))
    assert (f.expert_bytes, f.moe_layers, f.experts, f.experts_per_token) == (V3_EXPERT, 58, 256, 8)
    # 671.0B weights less the routed 653.9B: 17.1B resident, at 4.5 bits a little over 9.6 GB (8-bit routers,
    # float norms)
    assert 9.6e9 < f.resident_bytes < 10e9
    assert place(f, device("Apple M2 Ultra 192GB")).mode == "streamed"


# --- the table ---

def test_the_table_is_well_formed():
    names = [d.name for d in DEVICES]
    assert len(names) == len(set(names))
    for d in DEVICES:
        assert 0 < d.usable_bytes < d.memory_bytes and d.bandwidth > 1e10 and d.disk_bandwidth >= 3e9, d
        assert d.kind in ("unified", "vram", "ram") and d.family in ("apple", "nvidia", "pc")
    assert device("NVIDIA H200 141GB").bandwidth == 4.8e12
    assert device("Apple M3 Ultra 512GB").bandwidth == 819 * GB


def test_metal_working_set_rule():
    assert round(metal_working_set(16 * GIB) / (1 << 20), 2) == 10922.67  # as llama.cpp logs it
    assert metal_working_set(64 * GIB) == 48 * GIB


def test_select_devices():
    assert {d.family for d in select_devices("nvidia")} == {"nvidia"}
    assert [d.name for d in select_devices("pc")] == [d.name for d in DEVICES if d.family == "pc"]  # not "PCIe"
    assert [d.name for d in select_devices("h100, rtx 4090")] == ["NVIDIA GeForce RTX 4090 24GB",
                                                                 "NVIDIA H100 PCIe 80GB", "NVIDIA H100 SXM 80GB"]
    with pytest.raises(ValueError, match="no device matches 'tpu'"):
        select_devices("tpu")


def test_this_machine_is_measured_not_assumed(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_LLM_HOME", str(tmp_path))  # nothing measured yet
    here = this_machine(tmp_path)
    assert here.family == "this" and here.bandwidth is None and here.disk_bandwidth is None
    assert 0 < here.usable_bytes <= here.memory_bytes
    assert this_machine(tmp_path, max_memory=3 * GB).usable_bytes == 3 * GB

"""The memory planner (`rlhf-lab plan`): parameter counting on the meta device, DeepSpeed's estimators, the
ordering of options, and the command on a local tiny model and on an 8B Llama shape given by numbers."""
from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

from rlhf_lab.distributed import planner
from rlhf_lab.distributed.plan_command import plan_main
from rlhf_lab.distributed.planner import OPTIONS, PRECISIONS, Option, frozen_state_bytes, trained_state_bytes
from rlhf_lab.utils.errors import UserError

GIB = 1024 ** 3
LLAMA_8B = ["arch=llama", "hidden=4096", "layers=32", "heads=32", "kv_heads=8", "intermediate=14336",
            "vocab=128256", "tie_embeddings=false"]


def tiny_config(**overrides) -> GPT2Config:
    return GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=1000, **overrides)


def llama_8b_shape() -> planner.ModelShape:
    return planner.shape_from_config(AutoConfig.for_model(
        "llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False))


@pytest.mark.parametrize("tied", [True, False])
def test_meta_count_matches_a_real_tiny_gpt2(tied):
    config = tiny_config(tie_word_embeddings=tied)
    real = GPT2LMHeadModel(config)
    distinct = sum({id(p): p.numel() for p in real.parameters()}.values())
    shape = planner.shape_from_config(config)
    assert shape.params == distinct
    embedding = 1000 * 32
    with_repeats = sum(p.numel() for _, p in real.named_parameters(remove_duplicate=False))
    if tied:   # the LM head is the embedding: counted once
        assert real.lm_head.weight is real.transformer.wte.weight
        assert shape.params == with_repeats - embedding and shape.head_params == 0
    else:
        assert shape.params == with_repeats and shape.head_params == embedding   # lm_head: Linear(32, 1000), no bias
    assert shape.largest_layer == embedding and shape.largest_name == "transformer.wte"
    assert shape.scalar().params == shape.params - shape.head_params + 32   # score = Linear(32, 1, bias=False)


def test_largest_layer_is_the_largest_modules_own_parameters():
    shape = llama_8b_shape()
    assert shape.params == 8_030_261_248                   # Llama-3-8B
    assert shape.largest_layer == 128256 * 4096            # the embedding (and the untied LM head), not a block
    assert shape.head_params == 128256 * 4096 and shape.gated_mlp and (shape.kv_heads, shape.head_dim) == (8, 128)


@pytest.mark.parametrize("gpus,nodes", [(8, 1), (4, 2), (2, 1)])
def test_bf16_stages_2_and_3_are_deepspeeds_estimators(gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    P, L, N, bf16 = 774_030_080, 64_328_960, gpus * nodes, PRECISIONS["bf16"]
    gpu = lambda option: trained_state_bytes(P, L, gpus, nodes, option, bf16)[0]
    # stage_1_and_2.py: 2 (16-bit params) + 18/N (16-bit + fp32 grads, fp32 params, Adam m and v); offload: 2Ψ
    assert gpu(Option(2)) == 2 * P + int(18 * P / N)
    assert gpu(Option(2)) == estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=False)[1]
    assert gpu(Option(2, True)) == 2 * P
    # stage3.py: largest layer 4·L (16-bit param + grad) + 18/N; optimizer offload 2/N; parameter offload none
    assert gpu(Option(3)) == 4 * L + int(18 * P / N)
    assert gpu(Option(3)) == estimate_zero3_model_states_mem_needs(
        P, L, gpus, nodes, cpu_offload=False, cpu_offload_params=False, zero_init=True)[1]
    assert gpu(Option(3, True)) == 4 * L + int(2 * P / N)
    assert gpu(Option(3, True, True)) == 4 * L
    # ZeRO paper §3 / Fig. 1: 2Ψ + 2Ψ + 12Ψ, stage 1 partitions the 12Ψ
    assert gpu(Option(0)) == 16 * P and gpu(Option(1)) == 4 * P + 12 * P // N


def test_fp32_weights_formulas():
    P, L, N, fp32 = 1_000_000, 100_000, 4, PRECISIONS["autocast_bf16"]
    gpu = lambda option: trained_state_bytes(P, L, N, 1, option, fp32)[0]
    assert gpu(Option(0)) == (4 + 4 + 8) * P                         # weights, grads, Adam m + v
    assert gpu(Option(1)) == (4 + 4) * P + (4 + 8) * P // N          # master partition cloned + Adam, / N
    assert gpu(Option(2)) == 4 * P + (4 + 4 + 8) * P // N            # grads partitioned too
    assert gpu(Option(3)) == 8 * L + (4 + 4 + 4 + 8) * P // N        # DeepSpeed 0.19.8 clones the master at ZeRO-3 too
    assert gpu(Option(2, True)) == 4 * P
    assert gpu(Option(3, True)) == 8 * L + 4 * P // N and gpu(Option(3, True, True)) == 8 * L
    assert frozen_state_bytes(P, L, N, 1, Option(0), fp32) == (4 * P, 0)
    assert frozen_state_bytes(P, L, N, 1, Option(3), fp32) == (4 * (P // N + L), 0)
    assert frozen_state_bytes(P, L, N, 1, Option(3, True, True), fp32)[0] == 4 * L


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_more_partitioning_needs_less_per_gpu(precision):
    shape = llama_8b_shape()
    p = planner.plan(shape, "ppo", 8, 80, precision=precision)
    by = {r.option: r for r in p.rows}
    for role in ("actor", "critic"):
        assert by["zero3"].states[role] <= by["zero2"].states[role] <= by["zero1"].states[role] \
            <= by["zero0"].states[role]
        assert by["zero3+opt+param_off"].states[role] <= by["zero3+opt_off"].states[role] <= by["zero3"].states[role]


def test_ppo_needs_more_than_dpo():
    shape = llama_8b_shape()
    ppo, dpo = (planner.plan(shape, algo, 8, 80) for algo in ("ppo", "dpo"))
    for a, b in zip(ppo.rows, dpo.rows):
        assert sum(a.states.values()) > sum(b.states.values())
    assert list(ppo.rows[0].states) == ["actor", "critic", "reference", "reward"]
    assert list(dpo.rows[0].states) == ["policy", "reference"]


def test_plan_on_a_local_tiny_model_dir(tmp_path, capsys):
    GPT2LMHeadModel(tiny_config()).save_pretrained(tmp_path / "tiny")
    out = tmp_path / "plan.json"
    assert plan_main([f"model={tmp_path / 'tiny'}", "algo=dpo", "gpus=2", "gpu_gib=24", "micro_batch=4",
                      "seq_len=512", f"json={out}"]) == 0
    printed = capsys.readouterr().out
    assert "verdict: DPO on 2 × 24 GiB fits with zero0" in printed
    assert all(o.name in printed for o in OPTIONS)
    data = json.loads(out.read_text())
    assert data["cheapest"] == "zero0" and data["shape"]["params"] == sum(
        {id(p): p.numel() for p in GPT2LMHeadModel(tiny_config()).parameters()}.values())


def test_llama_8b_ppo_on_8_x_80(capsys):
    assert plan_main([*LLAMA_8B, "algo=ppo", "gpus=8", "gpu_gib=80"]) == 0
    printed = capsys.readouterr().out
    assert "verdict: PPO on 8 × 80 GiB fits with zero3" in printed and "does not fit: zero0, zero1, zero2" in printed
    p = planner.plan(llama_8b_shape(), "ppo", 8, 80)
    by = {r.option: r for r in p.rows}
    assert not by["zero0"].fits and by["zero3"].fits
    assert by["zero0"].total > 200 * GIB and 40 * GIB < by["zero3"].total < 72 * GIB


def test_stage_and_offload_selection(capsys):
    plan_main([*LLAMA_8B, "algo=dpo", "gpus=8", "gpu_gib=80", "stages=2,3", "offload=optimizer"])
    printed = capsys.readouterr().out
    assert "zero2+opt_off" in printed and "zero3+opt_off" in printed
    assert "zero3 " not in printed and "zero0" not in printed


@pytest.mark.parametrize("args,key", [
    (["arch=gpt2", "algo=ppo", "gpus=8", "gpu_gib=80", "colour=red"], "colour"),
    (["arch=gpt2", "algo=sft", "gpus=8", "gpu_gib=80"], "algo"),
    (["arch=gpt2", "algo=ppo", "gpus=0", "gpu_gib=80"], "gpus"),
    (["arch=gpt2", "algo=ppo", "gpus=8", "gpu_gib=lots"], "gpu_gib"),
    (["arch=gpt2", "algo=ppo", "gpus=8"], "gpu_gib"),
    (["algo=ppo", "gpus=8", "gpu_gib=80"], "model"),
    (["arch=nosuch", "algo=ppo", "gpus=8", "gpu_gib=80"], "arch"),
    (["arch=gpt2", "kv_heads=4", "algo=ppo", "gpus=8", "gpu_gib=80"], "kv_heads"),
    (["arch=llama", "heads=32", "kv_heads=5", "algo=ppo", "gpus=8", "gpu_gib=80"], "kv_heads"),
    (["arch=gpt2", "algo=ppo", "gpus=8", "gpu_gib=80", "precision=fp8"], "precision"),
    (["arch=gpt2", "algo=ppo", "gpus=8", "gpu_gib=80", "stages=1", "offload=param"], "stages"),
    (["model=gpt2", "layers=4", "algo=ppo", "gpus=8", "gpu_gib=80"], "layers"),
])
def test_bad_options_name_the_key(args, key):
    with pytest.raises(UserError, match=key):
        plan_main(args)


def test_unreachable_hub_suggests_the_arch_keys(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(AutoConfig, "from_pretrained", offline)
    with pytest.raises(UserError, match="model=gpt2-large.*arch=gpt2 hidden=1280 layers=36 heads=20"):
        plan_main(["model=gpt2-large", "algo=ppo", "gpus=8", "gpu_gib=80"])

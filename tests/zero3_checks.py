"""Run under `torchrun --nproc_per_node 2` by tests/test_zero3.py: DeepSpeedStrategy at ZeRO-3 on a tiny GPT-2
with tied embeddings. Rank 0 writes the checks' results as JSON to argv[2]; any failed assertion exits non-zero.

  1. partitioning at deepspeed.initialize keeps the file's weights exactly (gathered == loaded);
  2. after a training step, save_hf → from_pretrained gives torch.equal weights (tied lm_head included) and equal
     logits to the gathered engine;
  3. an EMA update through strategy.modify lands in the partitioned reference (modifier_rank=0);
  4. sampling with collective (not gathered) ZeRO-3 forwards does not hang when one rank's samples end after
     one token and the other's run to the length limit, and draws what the gathered model draws;
  5. models loaded inside `strategy.loading()` (transformers' zero.Init path) are partitioned as they are built
     and gather to exactly the file's weights, trained and frozen alike (transformers-5 ZeRO-3 loading has
     silently re-initialised weights before: transformers#43303, #43964); a scalar head initialised on a
     partitioned model equals the one initialised on a whole model with the same seed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from rlhf_lab.algos.ppo import ema_update
from rlhf_lab.config import OptimConfig, StrategyConfig
from rlhf_lab.distributed import comm
from rlhf_lab.distributed.deepspeed_strategy import DeepSpeedStrategy
from rlhf_lab.models.build import load_causal_lm
from rlhf_lab.models.heads import build_scalar_model, find_scalar_head
from rlhf_lab.trainers.loop import build_trained


def gathered(model) -> dict[str, torch.Tensor]:
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def synced_sampling_matches_gathered(engine, strategy) -> bool:
    from rlhf_lab.models.sampling import sample_completions

    prompts = [[5, 6, 7], [8, 9]]
    with strategy.generation() as full:  # greedy first token of rank 0's prompts: its samples end right there
        first = full(input_ids=torch.tensor([prompts[0]])).logits[0, -1].argmax().item()
    eos = first if comm.rank() == 0 else 63 if first != 63 else 62
    kwargs = dict(eos_id=eos, pad_id=0, max_new_tokens=6, temperature=0.0)
    with strategy.generation() as full:
        gathered_seqs = sample_completions(full, prompts, **kwargs)
    synced = sample_completions(engine, prompts, sync_finish=True, **kwargs)  # collective forwards
    lengths = comm.all_gather_object(synced.completion_lengths.tolist())
    return bool(torch.equal(synced.input_ids, gathered_seqs.input_ids)) and lengths[0][0] == 1 and lengths[1][0] > 1


def partitioned(model) -> bool:
    return all(hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel for p in model.parameters())


def zero_init_loading(source: Path, file_weights: dict) -> dict:
    """Check 5, with strategies of their own (one trained engine per strategy)."""
    strategy = DeepSpeedStrategy(StrategyConfig(name="deepspeed", zero_stage=3, reference_offload_param=True),
                                 device="cpu", micro_batch_size=2)
    with strategy.loading("trained"):
        policy = load_causal_lm(source)
    with strategy.loading("reference"):
        reference = load_causal_lm(source)
        scalar = build_scalar_model(source, pad_token_id=0, seed=3)
    whole_scalar = build_scalar_model(source, pad_token_id=0, seed=3)
    built_partitioned = partitioned(policy) and partitioned(reference) and partitioned(scalar)
    build_trained(strategy, policy, OptimConfig(lr=1e-2, warmup_steps=0))
    reference = strategy.place(reference)
    states = [gathered(strategy.unwrap()), gathered(strategy.unwrap(reference))]
    exact = all(torch.equal(state[k], file_weights[k]) for state in states for k in file_weights)
    head = find_scalar_head(scalar)
    with deepspeed.zero.GatheredParameters(list(head.parameters())):
        head_equal = bool(torch.equal(head.weight, find_scalar_head(whole_scalar).weight))
    return {"zero_init_partitioned": built_partitioned, "zero_init_exact": exact, "zero_init_head_seeded": head_equal}


def main(workdir: Path, result_path: Path) -> None:
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=64, bos_token_id=1,
                     eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    strategy = DeepSpeedStrategy(StrategyConfig(name="deepspeed", zero_stage=3), device="cpu", micro_batch_size=2)
    source = workdir / "source"
    if comm.is_main():
        torch.manual_seed(0)
        GPT2LMHeadModel(cfg).save_pretrained(source)
    comm.barrier()
    file_weights = AutoModelForCausalLM.from_pretrained(source).state_dict()
    engine = build_trained(strategy, AutoModelForCausalLM.from_pretrained(source), OptimConfig(lr=1e-2,
                                                                                                warmup_steps=0))
    module = strategy.unwrap()
    assert all(p.ds_numel > p.ds_tensor.numel() for p in module.parameters()), "parameters are not partitioned"
    loaded = gathered(module)
    results = {"load_exact": all(torch.equal(loaded[k], file_weights[k]) for k in file_weights)}

    x = torch.randint(2, 64, (2, 8), generator=torch.Generator().manual_seed(comm.rank()))
    strategy.backward(engine(input_ids=x, labels=x).loss)
    assert strategy.step().stepped
    trained = gathered(module)
    results["step_changed_weights"] = not torch.equal(trained["transformer.h.0.mlp.c_fc.weight"],
                                                      loaded["transformer.h.0.mlp.c_fc.weight"])
    strategy.save_hf(workdir / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(workdir / "export")
    state = reloaded.state_dict()
    results["export_exact"] = all(torch.equal(state[k], trained[k]) for k in trained)
    results["lm_head_tied"] = bool(torch.equal(state["lm_head.weight"], state["transformer.wte.weight"]))
    with strategy.generation() as full, torch.no_grad():
        results["export_logits_equal"] = bool(torch.equal(full(input_ids=x).logits, reloaded(input_ids=x).logits))

    reference = strategy.place(AutoModelForCausalLM.from_pretrained(source))
    before = gathered(strategy.unwrap(reference))
    with strategy.modify(reference, engine):
        ema_update(strategy.unwrap(reference).parameters(), module.parameters(), 0.5)
    after = gathered(strategy.unwrap(reference))
    key = "transformer.h.0.mlp.c_fc.weight"
    results["ema_landed"] = bool(torch.allclose(after[key], 0.5 * before[key] + 0.5 * trained[key], atol=1e-7)
                                 and not torch.equal(after[key], before[key]))
    results["synced_sampling"] = synced_sampling_matches_gathered(engine, strategy)
    results.update(zero_init_loading(source, file_weights))
    if comm.is_main():
        result_path.write_text(json.dumps(results))
    comm.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

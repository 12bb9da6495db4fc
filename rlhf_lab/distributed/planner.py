"""Per-GPU memory planner for PPO (RLHF) and DPO under DeepSpeed ZeRO: "does this fit?" (`rlhf-lab plan`).

Everything is bytes per GPU. Sources, cited where used:
- ZeRO paper: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
  §3 / Fig. 1: mixed-precision Adam holds 2Ψ (16-bit weights) + 2Ψ (16-bit grads) + KΨ (fp32 master weights,
  Adam momentum and variance; K = 12) bytes; stage 1 partitions the KΨ over the N data-parallel GPUs, stage 2
  the gradients too, stage 3 the weights too.
- DeepSpeed's own estimators, called for 16-bit weights at stages 2 and 3:
  `deepspeed/runtime/zero/stage_1_and_2.py::estimate_zero2_model_states_mem_needs` (GPU 2Ψ + 18Ψ/N, or 2Ψ with
  the optimizer offloaded; 18 = 2 16-bit grads + 4 fp32 grads + 4 fp32 master + 8 Adam) and
  `deepspeed/runtime/zero/stage3.py::estimate_zero3_model_states_mem_needs` (GPU 4·largest_layer + 18Ψ/N;
  4·largest_layer + 2Ψ/N with the optimizer offloaded; 4·largest_layer with the parameters offloaded too).
- Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", §4.1 eq. 1:
  a transformer layer stores s·b·h·(34 + 5·a·s/h) bytes of 16-bit activations without recomputation, and §4.2
  (full recomputation) 2·s·b·h bytes per layer plus one layer's working set.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

GiB = 1024 ** 3
BUFFER_FACTOR = 1.5   # DeepSpeed's estimators' default `additional_buffer_factor` (host memory only)


@dataclass(frozen=True)
class Precision:
    name: str
    weight: int    # bytes per weight as the model holds it (and per gradient)
    act: int       # bytes per stored activation element
    about: str


PRECISIONS = {
    "autocast_bf16": Precision("autocast_bf16", 4, 2, "fp32 weights and Adam, bf16 compute through torch.autocast "
                               "(DeepSpeed's \"torch_autocast\" section: the project's train.precision=bf16)"),
    "bf16": Precision("bf16", 2, 2, "bf16 weights and grads, fp32 master weights in the optimizer "
                      "(DeepSpeed's \"bf16\" section)"),
    "fp32": Precision("fp32", 4, 4, "fp32 weights, Adam and compute"),
}


@dataclass(frozen=True)
class Option:
    """One way to place the trained models (ZeRO stage, offload); frozen models follow (`frozen_state_bytes`)."""
    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False

    @property
    def offload(self) -> str:
        return "param" if self.offload_param else "optimizer" if self.offload_optimizer else "none"

    @property
    def name(self) -> str:
        return f"zero{self.stage}" + {"none": "", "optimizer": "+opt_off", "param": "+opt+param_off"}[self.offload]


# Cheapest first: less communication, then less host traffic (a CPU Adam step is slower than a ZeRO-3 gather).
OPTIONS = (Option(0), Option(1), Option(2), Option(3), Option(2, True), Option(3, True), Option(3, True, True))


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a causal LM, counted on the meta device (`shape_from_config`)."""
    params: int             # distinct parameters: a tied LM head counts once
    largest_layer: int      # the largest single module's own parameters (DeepSpeed's `model_to_params`)
    largest_name: str
    head_params: int        # the untied LM head's parameters (0 when tied to the input embedding)
    backbone_largest: int   # the largest module's own parameters, the LM head left out
    hidden: int
    layers: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool         # SwiGLU-style MLP (gate_proj): three intermediate-wide activations, not two

    def scalar(self) -> ModelShape:
        """The same backbone with a scalar head (critic, reward: a num_labels=1 `score` Linear(h, 1) in place of
        the LM head, as rlhf_lab.models.heads builds them)."""
        return ModelShape(self.params - self.head_params + self.hidden, max(self.backbone_largest, self.hidden),
                          self.largest_name, 0, max(self.backbone_largest, self.hidden), self.hidden, self.layers,
                          self.kv_heads, self.head_dim, self.intermediate, 0, self.gated_mlp)


def own_params(module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def count_params(model) -> tuple[int, int, str]:
    """(distinct parameters, largest module's own parameters, that module's name).

    Distinct by `id(param)`: DeepSpeed's `model_to_params` dedupes by `data_ptr()`, which is 0 for every tensor on
    the meta device. "Largest layer" is DeepSpeed's: the largest module's *own* parameters (`recurse=False`), the
    unit ZeRO-3 gathers at once — for LMs the token embedding (or an untied LM head), not a transformer block."""
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    name, largest = max(((n, own_params(m)) for n, m in model.named_modules()), key=lambda t: t[1])
    return total, largest, name


def shape_from_config(config) -> ModelShape:
    """Instantiate the causal LM of `config` on the meta device (no memory, no weights read) and measure it."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total, largest, name = count_params(model)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is None or head.weight is embed.weight
    head_params = 0 if tied else own_params(head)
    backbone_largest = max(own_params(m) for m in model.modules() if tied or m is not head)
    text = config.get_text_config()
    heads = text.num_attention_heads
    return ModelShape(
        params=total, largest_layer=largest, largest_name=name, head_params=head_params,
        backbone_largest=backbone_largest, hidden=text.hidden_size, layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * text.hidden_size,
        vocab=text.vocab_size, gated_mlp=any(n.endswith("gate_proj") for n, _ in model.named_modules()))


def deepspeed_estimators():
    """DeepSpeed's (zero2, zero3) model-state estimators; deepspeed is an optional extra of this package."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError as e:
        from rlhf_lab.utils.errors import UserError
        raise UserError(f"rlhf-lab plan uses DeepSpeed's memory estimators: pip install 'rlhf_lab[deepspeed]' ({e})")
    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def trained_state_bytes(params: int, largest: int, gpus: int, nodes: int, option: Option,
                        precision: Precision) -> tuple[int, int]:
    """(GPU bytes, host bytes per node) of a trained model's weights, gradients and Adam state.

    16-bit weights: stages 0/1 from the ZeRO paper (§3, Fig. 1: 2Ψ + 2Ψ + 12Ψ, stage 1 partitions the 12Ψ; at
    stage 0 DeepSpeed's BF16_Optimizer also keeps a flat fp32 gradient buffer, +4Ψ, not counted);
    stages 2/3 from DeepSpeed's estimators, every flag passed explicitly (their offload flags default to True).
    fp32 weights (autocast_bf16, fp32): weights 4, grads 4, Adam 8 bytes/param and no master copy at stage 0 (the
    torch optimizer steps the fp32 weights). DeepSpeed's ZeRO optimizers still clone an fp32 master partition,
    +4Ψ/N: stage_1_and_2.py `weights_partition = ...clone()`; stage3.py `_create_fp32_partitions` means to share
    fp32 weights ("we don't need another copy") but compares `tensor.device == self.device`, a torch.device with
    the accelerator's device-name string, False in torch 2.13, so 0.19.8 clones too (benchmarks/zero_memory.py
    measures it on CPU). The gathered largest layer costs weight + grad bytes (8·L; DeepSpeed's 4·L at 16 bits). Host side: the
    estimators', plus 2Ψ/nodes·1.5 for fp32 rather than 16-bit offloaded parameters."""
    estimate_zero2, estimate_zero3 = deepspeed_estimators()
    n, st, off_opt, off_par = gpus * nodes, option.stage, option.offload_optimizer, option.offload_param
    if off_opt and st < 2 or off_par and (st < 3 or not off_opt):
        raise ValueError(f"{option.name}: not a planned option")
    host, gpu = 0, 0
    if st == 3:
        host, gpu, _ = estimate_zero3(
            total_params=params, largest_layer_params=largest, num_gpus_per_node=gpus, num_nodes=nodes,
            cpu_offload=off_opt, cpu_offload_params=off_par, zero_init=True, additional_buffer_factor=BUFFER_FACTOR)
    elif st == 2:
        host, gpu = estimate_zero2(
            total_params=params, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=off_opt,
            additional_buffer_factor=BUFFER_FACTOR)
    host = int(host) if off_opt else 0
    if precision.weight == 2:
        return {0: 16 * params, 1: 4 * params + 12 * params // n}.get(st, gpu), host
    if off_par:
        host += int(2 * params / nodes * BUFFER_FACTOR)
    if st == 0:
        return 16 * params, 0                                  # 4 weights + 4 grads + 8 Adam (m, v)
    if st == 1:
        return 8 * params + 12 * params // n, 0                # replicated weights + grads; master + Adam / N
    if st == 2:
        return 4 * params + (0 if off_opt else 16 * params // n), host   # grads + master + Adam / N
    return 8 * largest + (0 if off_par else 4 * params // n if off_opt else 20 * params // n), host


def frozen_state_bytes(params: int, largest: int, gpus: int, nodes: int, option: Option,
                       precision: Precision) -> tuple[int, int]:
    """(GPU bytes, host bytes per node) of a frozen model (reference, reward): weights only. A replica at stages
    0-2; partitioned with the trained models at ZeRO-3 (Ψ/N plus the gathered largest layer); with parameter
    offload only the gathered layer stays on the GPU."""
    w, n = precision.weight, gpus * nodes
    if option.offload_param:
        return w * largest, w * params // nodes
    if option.stage == 3:
        return w * (params // n + largest), 0
    return w * params, 0


def layer_activation_bytes(shape: ModelShape, rows: int, seq: int, precision: Precision) -> int:
    """Activations one layer keeps for backward, after Korthikanti et al. 2022 §4.1 eq. 1 (s·b·h·34 bytes at 16
    bits): attention 11sbh, layer norms 4sbh, MLP 19sbh of which 16sbh are its two 4h-wide tensors (GeLU input and
    output). Written 18h + 4·I so a non-4h MLP scales, 18h + 6·I for a gated MLP (gate, up, their product); the
    5·a·s²·b score term is left out (SDPA / flash attention never stores the s×s scores); × act bytes / 2."""
    mlp = (6 if shape.gated_mlp else 4) * shape.intermediate
    return rows * seq * (18 * shape.hidden + mlp) * precision.act // 2


def training_activation_bytes(shape: ModelShape, rows: int, seq: int, precision: Precision,
                              checkpointing: bool) -> int:
    """All layers' activations; with activation checkpointing (Korthikanti §4.2, full recomputation) each layer
    keeps only its input, 2·s·b·h bytes, plus one layer's recomputed working set."""
    layer = layer_activation_bytes(shape, rows, seq, precision)
    if checkpointing:
        return shape.layers * rows * seq * shape.hidden * precision.act + layer
    return shape.layers * layer


def logits_bytes(shape: ModelShape, rows: int, seq: int, copies: int) -> int:
    """fp32 logits, b·s·V·4 bytes per copy: 3 when training (logits, log-softmax, their gradient), 2 in a
    no-grad forward (logits, log-softmax)."""
    return rows * seq * shape.vocab * 4 * copies


def kv_cache_bytes(shape: ModelShape, rows: int, seq: int, precision: Precision) -> int:
    """KV cache of generation: 2 (K and V) × layers × b × s × kv_heads × head_dim × bytes."""
    return 2 * shape.layers * rows * seq * shape.kv_heads * shape.head_dim * precision.act


@dataclass(frozen=True)
class Role:
    name: str
    trained: bool
    lm: bool   # has the LM head (actor, policy, reference); otherwise the scalar head (critic, reward)


_CRITIC_FREE = (Role("actor", True, True), Role("reference", False, True), Role("reward", False, False))
_PAIRED = (Role("policy", True, True), Role("reference", False, True))
ROLES = {"ppo": (Role("actor", True, True), Role("critic", True, False), Role("reference", False, True),
                 Role("reward", False, False)),
         "rloo": _CRITIC_FREE, "grpo": _CRITIC_FREE,
         "dpo": _PAIRED, "online_dpo": _PAIRED}   # online DPO's annotator is the gold reward or a judge by default
PAIRED_ALGOS = ("dpo", "online_dpo")                  # chosen and rejected in one forward: 2 × micro-batch rows
SAMPLING_ALGOS = ("ppo", "rloo", "grpo", "online_dpo")  # the trained policy also generates (its KV cache)


def working_bytes(role: Role, algo: str, shape: ModelShape, micro_batch: int, seq: int, precision: Precision,
                  checkpointing: bool) -> int:
    """Transient memory of a role's phase. Phases run one after another, so the peak is the largest of them.
    DPO forwards chosen and rejected together (2·micro_batch rows, as TRL and rlhf_lab.trainers.dpo do). An
    on-policy actor generates its rollouts (KV cache) and trains (activations + logits) at different times."""
    rows = 2 * micro_batch if algo in PAIRED_ALGOS else micro_batch
    if role.trained:
        train = training_activation_bytes(shape, rows, seq, precision, checkpointing)
        if not role.lm:
            return train
        train += logits_bytes(shape, rows, seq, 3)
        return max(train, kv_cache_bytes(shape, rows, seq, precision)) if algo in SAMPLING_ALGOS else train
    layer = layer_activation_bytes(shape, rows, seq, precision)   # a no-grad forward holds about one layer
    return layer + (logits_bytes(shape, rows, seq, 2) if role.lm else 0)


@dataclass
class Row:
    option: str
    states: dict[str, int]   # role -> GPU bytes of its weights (+ grads and Adam state when trained)
    working: int             # peak transient bytes (activations, logits, KV cache)
    total: int
    host_per_node: int
    fits: bool


@dataclass
class Plan:
    algo: str
    gpus: int
    nodes: int
    gpu_gib: float
    headroom: float
    precision: str
    micro_batch: int
    seq_len: int
    checkpointing: bool
    shape: ModelShape
    rows: list[Row] = field(default_factory=list)

    @property
    def usable(self) -> float:
        return self.gpu_gib * GiB * self.headroom

    def cheapest(self) -> Row | None:
        return next((r for r in self.rows if r.fits), None)

    def to_dict(self) -> dict:
        return {**asdict(self), "usable_gib": self.usable / GiB,
                "cheapest": None if self.cheapest() is None else self.cheapest().option,
                "precision_about": PRECISIONS[self.precision].about}


def plan(shape: ModelShape, algo: str, gpus: int, gpu_gib: float, nodes: int = 1, micro_batch: int = 1,
         seq_len: int = 1024, precision: str = "autocast_bf16", options=OPTIONS, headroom: float = 0.9,
         checkpointing: bool = False) -> Plan:
    """Every option's per-GPU bytes per role, the peak transient, the total and whether it fits in
    `headroom` × gpu_gib. All roles stay resident on every GPU (as the trainers keep them)."""
    prec = PRECISIONS[precision]
    result = Plan(algo, gpus, nodes, gpu_gib, headroom, precision, micro_batch, seq_len, checkpointing, shape)
    roles = ROLES[algo]
    working = max(working_bytes(r, algo, shape if r.lm else shape.scalar(), micro_batch, seq_len, prec,
                                checkpointing) for r in roles)
    for option in options:
        states, host = {}, 0
        for role in roles:
            s = shape if role.lm else shape.scalar()
            state_fn = trained_state_bytes if role.trained else frozen_state_bytes
            states[role.name], role_host = state_fn(s.params, s.largest_layer, gpus, nodes, option, prec)
            host += role_host
        total = sum(states.values()) + working
        result.rows.append(Row(option.name, states, working, total, host, total <= result.usable))
    return result


def format_table(p: Plan) -> str:
    """The plan as a text table, GiB per GPU."""
    s = p.shape
    setup = (f"{p.algo.upper()} on {p.nodes} node(s) × {p.gpus} GPU(s) of {p.gpu_gib:g} GiB (usable "
             f"{p.usable / GiB:.1f} GiB = {p.headroom:.0%}); precision {p.precision}: {PRECISIONS[p.precision].about}")
    model = (f"model: {s.params / 1e9:.3f} B parameters (largest layer {s.largest_layer / 1e6:.1f} M, "
             f"{s.largest_name}); scalar-head copy {s.scalar().params / 1e9:.3f} B; micro_batch {p.micro_batch}, "
             f"seq_len {p.seq_len}, activation checkpointing {'on' if p.checkpointing else 'off'}")
    head = [setup, model, "GiB per GPU: model states per role, working = peak of activations / logits / KV cache"]
    roles = list(p.rows[0].states) if p.rows else []
    cols = ["option", *roles, "working", "total", "fits", "host/node"]
    lines = [[r.option, *(f"{r.states[k] / GiB:.2f}" for k in roles), f"{r.working / GiB:.2f}",
              f"{r.total / GiB:.2f}", "yes" if r.fits else "no",
              f"{r.host_per_node / GiB:.1f}" if r.host_per_node else "-"] for r in p.rows]
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join(head + [fmt(cols)] + [fmt(line) for line in lines])


def verdict(p: Plan) -> str:
    """One line: the cheapest option that fits, or the smallest total when none does."""
    setup = f"{p.algo.upper()} on {p.nodes * p.gpus} × {p.gpu_gib:g} GiB"
    best = p.cheapest()
    if best is not None:
        no = [r.option for r in p.rows[:p.rows.index(best)]]
        return (f"verdict: {setup} fits with {best.option} ({best.total / GiB:.1f} of {p.usable / GiB:.1f} GiB "
                f"usable per GPU)" + (f"; does not fit: {', '.join(no)}" if no else ""))
    if not p.rows:
        return f"verdict: {setup}: no option evaluated"
    low = min(p.rows, key=lambda r: r.total)
    return (f"verdict: {setup} does not fit with any option evaluated; the smallest is {low.option} at "
            f"{low.total / GiB:.1f} GiB > {p.usable / GiB:.1f} GiB usable per GPU")

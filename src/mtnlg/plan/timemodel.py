"""Iteration time from parts, priced with a :class:`~mtnlg.plan.profile.Profile`.

For one micro-batch on one pipeline stage (b micro-batch, s sequence, h hidden, f FFN, a heads,
d = h/a, t tensor-parallel size, T = b·s tokens, r = 1/t with sequence parallelism else 1):

* **gemm**: per layer the forward matmuls QKV (T, 3h/t, h), proj (T, h, h/t), fc1 (T, f/t, h) and
  fc2 (T, h, f/t) as (m, n, k); each backward has the input-gradient (m, k, n) and the weight-gradient
  (k, n, m) matmul; full recomputation runs the forward ones again. Each at its shape's rate in the
  profile, and a shape the profile did not measure no faster than its operands and result move at the
  element-wise bandwidth (thin matmuls, e.g. attention's with k = d, are bound by memory, not by FLOPs).
  The last stage adds the logit layer (T, V/t, h) and its two backward matmuls.
* **attention**: ``unfused``: b·a/t batched matmuls (s, s, d) for QKᵀ and (s, d, s) for softmax·V,
  2 backward matmuls each (the forward recomputed under full and selective recomputation), at the
  rate of the batched call's total FLOPs;
  ``fused``: 4·T·s·h/t FLOPs forward, 3x that forward + backward, at the measured fused rate.
* **elementwise**: bytes at the profile's bandwidth. Forward per layer, in elements: LayerNorms
  2·(2·T·h·r), dropout + residual adds 2·(3·T·h·r), bias + GELU 2·T·f/t, and unfused attention's
  softmax + dropout 4·b·a·s²/t; the backward moves twice the forward's bytes, recomputation once more.
  The first stage adds the embedding (3·T·h), the last the fp32 cross entropy (5·T·V/t, 4 bytes).
  Gradient accumulation: every micro-batch after the first adds its weight gradients into the held
  unsharded ones (autograd's ``.grad +=``: read both, write one, 3 x the gradient's bytes per
  parameter; fused into the weight-gradient matmul only by Megatron's later
  ``--gradient-accumulation-fusion``).
* **overhead**: launch/dispatch cost per op (profile ``op_overhead``) x ops: 14 per layer forward (the
  ops of :class:`mtnlg.model.transformer.Block`), 28 backward, 14 per recomputed forward, 6 for the
  embedding and 12 for the logits and loss per micro-batch; per step 16 optimizer and clipping
  kernels plus one per parameter tensor (12 per layer + 4); with several ranks, 4 tiny all-reduces
  over the world per step (loss, gradient norm, finite check, skip/stop flags), 5 with dp > 1 (the
  token count for the gradient scale). The profile's framework terms add, per micro-batch, the host time
  of DTensor tensor parallelism per block (tp > 1) and of FSDP2's hooks per unit (dp > 1: mtnlg runs
  every data-parallel layout, replicated or sharded, through ``fully_shard``; a unit per block and one
  for the rest).
* **optimizer**: Adam's bytes per parameter the GPU updates (mixed precision: reads fp32 master,
  m, v, fp32 grad, writes master, m, v, bf16 copy = 30 B; fp32: 28 B) + the gradient-norm read.
* **tp_comm**: per layer and micro-batch 2 collectives forward, 2 backward (+2 under full
  recomputation) of the T·h activation: all-reduces, or all-gather + reduce-scatter pairs with SP;
  one more for the vocab-parallel embedding (first stage) and one for gathering the logits' input
  (last stage); 3 all-reduces of T fp32 values for the vocab-parallel cross entropy. Each of these
  synchronising calls also waits the profile's ``collective_wait_s`` for a peer that drifted behind.
* **pp_comm**: per micro-batch and model chunk one forward and one backward send of T·h/t elements;
  without SP the receiver all-gathers the T·h activation over tp (Megatron's scatter/gather).
* **bubble**: f/(1-f) x (everything above but the optimizer), f the schedule's bubble fraction. Where
  ranks share cores (CPU), a rank waiting in the bubble frees its core (and the caches and memory
  bandwidth the profile's ``shared_speed`` prices) for the others: the iteration takes the longer of the
  shared-core work and the pipeline's own length at full speed.
* **dp_comm**: the gradient reduction over dp (ZeRO-0 all-reduce; ZeRO-1/2 reduce-scatter +
  all-gather of the weights; ZeRO-3 an all-gather forward and backward per micro-batch and one
  reduce-scatter: mtnlg's FSDP2 holds unsharded gradients until the last micro-batch), less the part
  the profile's ``overlap`` hides behind backward compute (the last micro-batch's backward for
  ZeRO-0/1/2; all compute for ZeRO-3, whose gathers are prefetched). Each is one collective per block
  and one for the embeddings and the rest (FSDP2's units in mtnlg), each paying the latency. Across
  nodes each of the group's devices on a node brings its own network link (tp fastest in rank order:
  min(dp, devices per node / tp) of them), so a tp=1 group crosses nodes 8x as fast as a tp=8 one.

Every term is scaled by max(1, devices per host / profile concurrency): CPU ranks sharing cores run
their kernels, their host code and their gloo communication (copies, and waiting for a peer that is
itself waiting for a core) at that share of a core.
With more than one device of a host at work, the kernels (matmuls, attention, element-wise, optimizer)
run at the profile's ``shared_speed``: CPU cores share caches, memory bandwidth and power.
The slowest stage (the first or the last) sets the pace of the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtnlg.plan.profile import Profile

OPS_PER_LAYER_FWD = 14
OPS_PER_STEP = 16  # foreach AdamW (~10 kernels) + gradient-norm clipping (~6)
TERMS = ("gemm", "attention", "elementwise", "overhead", "tp_comm", "pp_comm", "bubble", "dp_comm", "optimizer")


@dataclass(frozen=True)
class Shape:
    """What the time model needs of a model and layout."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    vocab: int  # padded
    seq: int
    micro_batch: int
    microbatches: int
    tp: int = 1
    pp: int = 1
    dp: int = 1
    chunks: int = 1
    recompute: str = "none"
    zero: int = 0
    sp: bool = True
    dtype_bytes: int = 2
    mixed_precision: bool = True
    params_per_gpu: float = 0.0
    bubble_fraction: float = 0.0
    gpus_per_node: int = 8

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


def _linear(p: Profile, m: int, n: int, k: int, passes: tuple[float, float, float], eb: int) -> float:
    """Forward (m, n, k), input-grad (m, k, n), weight-grad (k, n, m), each run ``passes[i]`` times."""
    fwd, dgrad, wgrad = passes
    return (fwd * p.gemm_time(m, n, k, elem_bytes=eb) + dgrad * p.gemm_time(m, k, n, elem_bytes=eb)
            + wgrad * p.gemm_time(k, n, m, elem_bytes=eb))


def stage_parts(p: Profile, sh: Shape, first: bool, last: bool) -> dict[str, float]:
    """Seconds of one micro-batch (forward + backward) on one stage, by compute term."""
    b, s, h, f, a, t = sh.micro_batch, sh.seq, sh.hidden, sh.ffn, sh.heads, sh.tp
    T, d, L = b * s, h // a, sh.layers // sh.pp
    r = 1 / t if sh.sp and t > 1 else 1.0
    full = sh.recompute == "full"
    passes = (2.0 if full else 1.0, 1.0, 1.0)
    eb = sh.dtype_bytes
    layer_gemm = (_linear(p, T, 3 * h // t, h, passes, eb) + _linear(p, T, h, h // t, passes, eb)
                  + _linear(p, T, f // t, h, passes, eb) + _linear(p, T, h, f // t, passes, eb))
    heads = b * a // t
    att_fwd_again = 1.0 if sh.recompute in ("full", "selective") else 0.0
    if p.attention_kind == "fused":
        flops = 4.0 * T * s * h / t
        layer_att = (3 + att_fwd_again) * flops / p.attention_rate(s, d)
        softmax = 0.0
    else:
        fwd = 1 + att_fwd_again  # QK^T (s, s, d) and softmax.V (s, d, s); each backward has 2 matmuls
        layer_att = sum(c * p.batched_gemm_time(heads, *mnk, elem_bytes=eb) for mnk in ((s, s, d), (s, d, s))
                        for c in (fwd, 2))
        softmax = 4.0 * b * a * s * s / t
    fwd_elems = 2 * 2 * T * h * r + 2 * 3 * T * h * r + 2 * T * f / t + softmax
    ew_passes = 3 + (1 if full else 0)  # forward 1 + backward 2 (+ recomputed forward)
    ew_bytes = ew_passes * fwd_elems * sh.dtype_bytes
    if sh.recompute == "selective":
        ew_bytes += softmax * sh.dtype_bytes
    ops = L * OPS_PER_LAYER_FWD * (3 + (1 if full else 0))
    host = L * p.tp_layer_s if t > 1 else 0.0
    if sh.dp > 1:
        host += (L + 1) * p.fsdp_unit_s
    gemm = L * layer_gemm
    elementwise = L * ew_bytes / p.elementwise_bw
    if first:
        elementwise += 3 * 3 * T * h * sh.dtype_bytes / p.elementwise_bw
        ops += 6
    if last:
        V = sh.vocab
        gemm += _linear(p, T, V // t, h, (1, 1, 1), eb)
        elementwise += 5 * T * V / t * 4 / p.elementwise_bw
        ops += 12
    return {"gemm": gemm, "attention": L * layer_att, "elementwise": elementwise,
            "overhead": ops * p.op_overhead_s + host}


def tp_time(p: Profile, sh: Shape) -> float:
    """TP collectives of one micro-batch on one stage (on the critical path)."""
    if sh.tp == 1:
        return 0.0
    act = sh.micro_batch * sh.seq * sh.hidden * sh.dtype_bytes
    n = 6 if sh.recompute == "full" else 4
    span, g = sh.tp, sh.gpus_per_node
    if sh.sp:  # each all-reduce becomes an all-gather + reduce-scatter pair (the same bytes)
        one = p.collective_time("all_gather", act, sh.tp, span, g) + p.collective_time("reduce_scatter", act, sh.tp,
                                                                                         span, g)
    else:
        one = p.collective_time("all_reduce", act, sh.tp, span, g)
    ends = 2 if sh.pp == 1 else 1  # vocab-parallel embedding (first stage), gathering for the logits (last)
    ce = 3 * p.collective_time("all_reduce", sh.micro_batch * sh.seq * 4, sh.tp, span, g)  # max, sum, target
    units = n * (sh.layers // sh.pp) + ends  # all-reduces, or all-gather + reduce-scatter pairs under SP
    calls = units * (2 if sh.sp else 1) + 3  # the synchronising calls, cross entropy's 3 included
    return units * one + ce + calls * p.collective_wait_s


def step_sync_time(p: Profile, sh: Shape) -> float:
    """Once per step, tiny all-reduces over the world: the loss, the gradient norm, the finite check and
    the skip/stop flags (:mod:`mtnlg.train.step`, :mod:`mtnlg.train.loop`), and with dp > 1 the token count."""
    if sh.world == 1:
        return 0.0
    return (4 + (sh.dp > 1)) * p.collective_time("all_reduce", 8, sh.world, sh.world, sh.gpus_per_node)


def pp_time(p: Profile, sh: Shape) -> float:
    """Pipeline sends of one micro-batch on one stage: one forward and one backward per model chunk, each
    of the tp ranks sending its 1/tp share of the activation. Without sequence parallelism the activation
    is replicated over the tp ranks, so the receiver all-gathers the shares over the node's links to rebuild
    it (Megatron's scatter/gather, Narayanan et al. 2021 sec. 4.1); with it, the shares are what it keeps."""
    if sh.pp == 1:
        return 0.0
    act = sh.micro_batch * sh.seq * sh.hidden * sh.dtype_bytes
    one = p.collective_time("send_recv", act / sh.tp, 2, sh.world, sh.gpus_per_node)
    if sh.tp > 1 and not sh.sp:
        one += p.collective_time("all_gather", act, sh.tp, sh.tp, sh.gpus_per_node)
    return 2 * sh.chunks * one


def dp_times(p: Profile, sh: Shape) -> tuple[float, float]:
    """(total, per micro-batch) seconds of the data-parallel communication of one iteration."""
    if sh.dp == 1:
        return 0.0, 0.0
    lanes = min(sh.dp, max(1, sh.gpus_per_node // sh.tp))  # the group's devices on one node (tp fastest)
    units = sh.layers // sh.pp + 1  # one collective per block and one for the rest (fully_shard per block)

    def coll(op: str, nbytes: float) -> float:
        return units * p.collective_time(op, nbytes / units, sh.dp, sh.tp * sh.dp, sh.gpus_per_node, lanes)

    wbytes = sh.params_per_gpu * sh.dtype_bytes
    gbytes = sh.params_per_gpu * (sh.dtype_bytes if sh.mixed_precision else 4)
    if sh.zero >= 3:  # gathers every micro-batch; the reduce-scatter once, with the last micro-batch
        per_mb = 2 * coll("all_gather", wbytes)
        return per_mb * sh.microbatches + coll("reduce_scatter", gbytes), per_mb
    total = coll("reduce_scatter", gbytes) + coll("all_gather", wbytes) if sh.zero >= 1 else coll("all_reduce", gbytes)
    return total, total


def step_ops(sh: Shape) -> int:
    """Ops once per step: the optimizer's and clipping's kernels and one per parameter tensor."""
    return OPS_PER_STEP + 12 * (sh.layers // sh.pp) + 4


def accumulate_time(p: Profile, sh: Shape) -> float:
    """Adding one micro-batch's weight gradients into the held ones (unsharded until the last micro-batch,
    under FSDP too: see ``set_requires_gradient_sync`` in :mod:`mtnlg.train.step`)."""
    return 3 * sh.params_per_gpu * sh.dtype_bytes / p.elementwise_bw


def optimizer_time(p: Profile, sh: Shape) -> float:
    """Adam over the parameters this GPU updates, and the gradient-norm pass."""
    per_param = 30 if sh.mixed_precision else 28
    updated = sh.params_per_gpu / (sh.dp if sh.zero >= 1 else 1)
    grads = sh.params_per_gpu / (sh.dp if sh.zero >= 2 else 1) * (4 if sh.mixed_precision else sh.dtype_bytes)
    return (updated * per_param + grads) / p.elementwise_bw


def iteration_terms(p: Profile, sh: Shape) -> dict[str, float]:
    """Every term of the iteration time (seconds); their sum is the estimate."""
    slow = max(1.0, min(sh.world, sh.gpus_per_node) / p.concurrency)
    if sh.pp == 1:
        per_mb = stage_parts(p, sh, True, True)
    else:
        a, z = stage_parts(p, sh, True, False), stage_parts(p, sh, False, True)
        per_mb = a if sum(a.values()) >= sum(z.values()) else z
    m = sh.microbatches
    kernels = slow / (p.shared_speed if min(sh.world, sh.gpus_per_node) > 1 else 1.0)
    terms = {k: m * v * (slow if k == "overhead" else kernels) for k, v in per_mb.items()}
    terms["elementwise"] += (m - 1) * accumulate_time(p, sh) * kernels
    terms["tp_comm"] = m * tp_time(p, sh) * slow
    terms["pp_comm"] = m * pp_time(p, sh) * slow
    f = sh.bubble_fraction
    busy = sum(terms.values())
    kernel_s = sum(terms[k] for k in ("gemm", "attention", "elementwise"))
    full_speed = (busy - kernel_s * (1 - slow / kernels)) / slow  # the same work, cores and caches unshared
    terms["bubble"] = max(0.0, full_speed / (1 - f) - busy) if f < 1 else float("inf")
    total, _ = dp_times(p, sh)
    if sh.zero >= 3:
        window = busy
    else:
        backward = (per_mb["gemm"] + per_mb["attention"]) * kernels
        window = backward * 2 / (4 if sh.recompute == "full" else 3)  # the last micro-batch's backward
    terms["dp_comm"] = (total - p.overlap * min(total, window)) * slow
    terms["optimizer"] = optimizer_time(p, sh) * kernels
    terms["overhead"] += (step_ops(sh) * p.op_overhead_s + step_sync_time(p, sh)) * slow
    return {k: terms[k] for k in TERMS}


def limiting_term(terms: dict[str, float]) -> str:
    """The largest term of an iteration."""
    return max(terms, key=lambda k: terms[k])


def largest_loss(terms: dict[str, float]) -> str:
    """The largest term beyond the matmuls and attention themselves (what to attack first)."""
    return max((k for k in terms if k not in ("gemm", "attention")), key=lambda k: terms[k])


def lookup_shapes(sh: Shape) -> tuple[set[tuple[int, int, int]], set[tuple[int, int, int]]]:
    """The matmul shapes (m, n, k) and fused-attention shapes (batch x heads, s, d) this layout prices:
    what ``mtnlg plan --calibrate`` measures so that no lookup has to interpolate."""
    b, s, h, f, a, t = sh.micro_batch, sh.seq, sh.hidden, sh.ffn, sh.heads, sh.tp
    T = b * s
    gemms: set[tuple[int, int, int]] = set()
    for m, n, k in ((T, 3 * h // t, h), (T, h, h // t), (T, f // t, h), (T, h, f // t), (T, sh.vocab // t, h)):
        gemms |= {(m, n, k), (m, k, n), (k, n, m)}
    return gemms, {(b * a // t, s, h // a)}

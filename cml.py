"""Cooperative Meta-Learning (CML) on MAML or MAML++.

Paper: "Cooperative Meta-Learning with Gradient Augmentation", arXiv 2406.04639 (CML, shared/papers/003;
reference code JJongyn/CML). A co-learner head, trained by the outer loop only, reads
the feature map of the adapted extractor; its query loss adds gradient to the extractor's initialisation.

Names (per task t of the batch, K inner steps, θ = Conv4 incl. its head, φ = the co-learner):
    θ_{t,K}  = the base method's inner loop from θ, without gradient sharing       `inner_loop`
    z_t      = Conv4 blocks at θ_{t,K} on the query set, the last one before its pooling  `prepool_features`
    L_t^meta = CE(head_{θ_{t,K}}(pool(z_t)), y_q)       the base method's query loss   `common.query_loss_grads`
    L_t^co   = CE(φ(z_t), y_q), φ = --colearner-blocks conv blocks, max-pool, linear    `colearner_forward`
    L        = (1/T) Σ_t L_t^meta + γ (1/T) Σ_t L_t^co, γ = --gamma                   `meta_gradient`
Outer step: Adam on (θ, φ) [and MAML++'s LSLR / per-step BN] with ∇L. φ is never adapted in the inner
loop and never used at evaluation: `predict` is the base method's, on the meta-learner's parameters only.

Decisions (shared/DESIGN.md; where the paper is silent):
- The base's inner loop is a copy of maml_gs.py's / mamlpp_gs.py's with gradient sharing off (no m, λ, ĝ):
  mamlpp_gs.py's loop, which with fixed rates [α]·K and BN in θ (the maml base) is maml_gs.py's step for step.
  So are the base's meta-parameters and init, MSL weights, first-order epochs, clamp, cosine outer lr and
  prediction (--no-gs). tests/test_cml.py checks that at γ = 0 the meta-gradient equals maml_gs.py's /
  mamlpp_gs.py's bitwise, and that init, prediction and outer lr equal theirs.
- z_t recomputes conv4_features' ops (conv, batch-statistics BN, ReLU, max-pool) and stops before the last
  pooling; with MAML++ per-step BN, the query forward uses BN row K, as the base's query loss.
- φ's blocks are Conv4's (3×3 conv, BN on batch statistics with learned scale/shift, ReLU), --filters
  channels; its linear layer has the meta-learner head's input size (same pooling). Xavier init, zero biases,
  from a generator seeded --seed + COLEARNER_SEED_OFFSET (independent of θ's draws).
- Where this differs from the reference code (JJongyn/CML): one Adam for the whole run (train_cml.py makes new
  Adam optimisers every 100-iteration epoch, resetting their moments); φ is initialised like θ (Xavier, zero
  biases), the reference keeps PyTorch's default layer init; the reference meta-tests the single best
  validation model on 10,000 tasks: compare its numbers with result.json's test_acc_best, not the top-5
  ensemble. --colearner-blocks 2 is the reference's co-learner (Conv(2)); the paper's ablation finds Conv(0)
  best for 1-shot.
- MAML++'s multi-step loss applies to L^meta only; L^co is taken at θ_{t,K}. MAML++'s clamp applies to the
  summed network gradient; φ's gradient is not clamped.
- Logged per epoch (means over the epoch's finite meta-iterations, kept in `state` as lwdgh.py does):
  loss_meta, loss_co (the two query losses; loss_meta MSL-weighted while MAML++'s MSL is on; the logged
  train_loss is loss_meta + γ loss_co), grad_cos and grad_norm_ratio = ‖g_co‖/‖g_meta‖ between
  g_meta = ∇L^meta and g_co = ∇L^co (γ not applied) w.r.t. the extractor's conv and BN tensors of θ
  (meta-gradients, through the inner loop). These two cost a second backward through the inner loop, so they
  are taken from every --grad-stats-every-th (10) meta-iteration of an epoch; the others backpropagate
  g_meta + γ g_co at once (28×28 1-shot: 2.35 s a meta-iteration with both backwards, tools/bench.py).

Reproduces paper 003's MiniImagenet 5-way rows (paper headline: CML on MAML++ 5-shot, 70.08%), MAML+CML
and MAML++ +CML, 1-shot and 5-shot. MAML rows with the reference's run_cml.sh / train_cml.py settings (task
batch 4, one inner step of 0.5, 64 filters, Adam 1e-3, 300 × 100 meta-iterations); MAML++ rows with
mamlpp_gs.py's defaults and a task batch of 2, our assumption (the reference ships no MAML++ configuration):
    python cml.py --dataset miniimagenet --base maml --shots 1 --tasks 4 --inner-steps 1 --inner-lr 0.5 --filters 64 --outer-lr 1e-3 --epochs 300 --iters-per-epoch 100
    python cml.py --dataset miniimagenet --base maml --shots 5 --tasks 4 --inner-steps 1 --inner-lr 0.5 --filters 64 --outer-lr 1e-3 --epochs 300 --iters-per-epoch 100
    python cml.py --dataset miniimagenet --base mamlpp --shots 1 --tasks 2 --epochs 250 --clip-grad 10
    python cml.py --dataset miniimagenet --base mamlpp --shots 5 --tasks 2 --epochs 250 --clip-grad 10
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F

import common


@dataclass
class Args(common.Args):
    base: Literal["maml", "mamlpp"] = "maml"
    """base method whose inner loop adapts θ: maml (maml_gs.py --no-gs) or mamlpp (mamlpp_gs.py --no-gs)"""
    gamma: float = 1.0
    """weight γ of the co-learner's query loss in the outer loss"""
    colearner_blocks: int = 2
    """conv blocks of the co-learner before its max-pool and linear layer (the paper's Conv(n); 0: linear only)"""
    grad_stats_every: int = 10
    """log grad_cos / grad_norm_ratio from every N-th meta-iteration of an epoch (each costs a second backward); 0: never"""
    inner_steps: int = 5
    """inner-loop steps K, at meta-training and meta-test"""
    inner_lr: float = 0.1
    """inner-loop learning rate α (MAML++: the initial value of every LSLR rate)"""
    first_order: bool = False
    """maml base: first-order approximation: no gradient through the inner-loop gradients"""
    lslr: bool = True
    """mamlpp base: learn an inner learning rate per adapted tensor per step (LSLR)"""
    per_step_bn: bool = True
    """mamlpp base: per-step BatchNorm scale and shift, learned by the outer loop only"""
    msl_epochs: int = 15
    """mamlpp base: epochs with the multi-step loss (MSL); 0: the final step only"""
    first_order_epochs: int = 0
    """mamlpp base: epochs of first-order meta-gradients before second order; 0: off"""
    cosine: bool = True
    """mamlpp base: cosine annealing of the outer learning rate from --outer-lr to --min-outer-lr"""
    min_outer_lr: float = 1e-5
    """mamlpp base: outer learning rate at the end of the cosine annealing"""
    clip_grad: float = 0.0
    """mamlpp base: clamp each meta-gradient element of the network to ±this value; 0: off"""
    recompute: bool = False
    """gradient checkpointing: recompute each inner step but the last in the backward pass; less memory, more time"""

    def check(self) -> list[str]:
        problems = super().check()
        if self.inner_steps < 1:
            problems.append(f"--inner-steps must be a positive integer, got {self.inner_steps}")
        if not self.inner_lr > 0:
            problems.append(f"--inner-lr must be positive, got {self.inner_lr}")
        if self.base == "mamlpp":
            for name in ("msl_epochs", "first_order_epochs", "clip_grad"):
                if not getattr(self, name) >= 0:
                    problems.append(f"--{name.replace('_', '-')} must be 0 (off) or positive, got {getattr(self, name)}")
            if self.cosine and not 0 <= self.min_outer_lr <= self.outer_lr:
                problems.append(f"--min-outer-lr must lie in [0, --outer-lr = {self.outer_lr}], got {self.min_outer_lr}")
        if self.grad_stats_every < 0:
            problems.append(f"--grad-stats-every must be 0 (never) or a positive integer, got {self.grad_stats_every}")
        if self.colearner_blocks < 0:
            problems.append(f"--colearner-blocks must be 0 or a positive integer, got {self.colearner_blocks}")
        if not self.gamma >= 0:
            problems.append(f"--gamma must be 0 or positive, got {self.gamma}")
        other = "maml" if self.base == "mamlpp" else "mamlpp"
        problems += [f"--{f.name.replace('_', '-')} applies to --base {other} only" for f in dataclasses.fields(Args)
                     if f.name in BASE_ONLY[other] and getattr(self, f.name) != f.default]
        return problems


BASE_ONLY = {"maml": ("first_order",),  # the flags that one base reads and the other rejects
             "mamlpp": ("lslr", "per_step_bn", "msl_epochs", "first_order_epochs", "cosine", "min_outer_lr", "clip_grad")}
LSLR = "lslr."  # lslr.<name>: the learned inner learning rates of adapted tensor <name>, one per step (K,)
BN = "bn"  # Conv4's BatchNorm tensors bn{i}.weight and bn{i}.bias; per-step: (K+1, C), else (C,)
MSL_FLOOR = 0.03  # MSL: each non-final weight falls to at least MSL_FLOOR / K (the reference's value)
COLEARNER = "colearner."  # colearner.<name>: the co-learner's tensors φ, meta-parameters like θ
COLEARNER_SEED_OFFSET = 1  # φ's init generator: --seed + this
EXTRACTOR = ("conv", "bn")  # θ's feature extractor: conv{i}.* and bn{i}.*, not the head
LOSS_STATS = ("loss_meta", "loss_co")  # every meta-iteration
GRAD_STATS = ("grad_cos", "grad_norm_ratio")  # every --grad-stats-every-th: they need g_meta and g_co apart
STATS = LOSS_STATS + GRAD_STATS


def step_weights(fast: dict[str, torch.Tensor], bn: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """The Conv4 parameters of a forward at θ_{t,step}: the fast weights and BN row `step`, each (tasks, ...)."""
    tasks = next(iter(fast.values())).shape[0]
    return {**fast, **{name: p[step].expand(tasks, *p.shape[1:]) for name, p in bn.items()}}


def inner_step(fast: dict[str, torch.Tensor], k: int, bn: dict[str, torch.Tensor], lslr: dict[str, torch.Tensor | list],
               x_s: torch.Tensor, y_s: torch.Tensor, *, create_graph: bool, use_vmap: bool):
    """Inner step k+1 for every task of the batch (k counts from 0 here and indexes the rates and BN rows).

    Returns θ_{t,k+1} for every task, (tasks, ...) per tensor.
    """
    net = step_weights(fast, bn, k)  # the weights after k updates, with BN row k
    logits = common.forward_tasks(common.conv4_forward, net, x_s, use_vmap)  # (tasks, ways*shots, ways)
    # Σ_t L_t, each L_t a mean over task t's own support set. Tasks share nothing in the forward pass,
    # so one backward gives every task's gradient w.r.t. its own fast weights: ∇L_t, (tasks, ...).
    loss = F.cross_entropy(logits.flatten(0, 1), y_s.flatten(), reduction="sum") / y_s.shape[1]
    grads = dict(zip(fast, torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)))
    return {name: w - lslr[name][k] * grads[name] for name, w in fast.items()}  # LSLR: a rate per tensor, step


def inner_loop(theta: dict[str, torch.Tensor], bn: dict[str, torch.Tensor], lslr: dict[str, torch.Tensor | list],
               x_s: torch.Tensor, y_s: torch.Tensor, *, inner_steps: int, create_graph: bool, use_vmap: bool,
               recompute: bool = False):
    """Adapt θ to every task of the batch: K inner steps of the base method, without gradient sharing.

    theta: the initialisation of the adapted tensors; bn: the per-step BN tensors (K+1, C), or {} when BN
    is in theta (the maml base); lslr: each adapted tensor's rates, (K,) or a list of K floats when fixed
    (the maml base: [α] * K, maml_gs.py's step); x_s (tasks, ways*shots, C, H, W), y_s (tasks, ways*shots).
    Returns the trajectory [θ_{t,0}, ..., θ_{t,K}] (MSL needs every step), each a dict of (tasks, ...) tensors.
    recompute: keep only the input of steps 1..K-1 and recompute each in the backward pass (gradient
    checkpointing; step K, the first the backward needs, stays stored): the same gradients with less
    memory, for one more forward-backward per earlier step.
    """
    tasks = x_s.shape[0]
    fast = {name: p.expand(tasks, *p.shape) for name, p in theta.items()}  # θ_{t,0} = θ, (tasks, ...)
    step = partial(inner_step, bn=bn, lslr=lslr, x_s=x_s, y_s=y_s, create_graph=create_graph, use_vmap=use_vmap)
    trajectory = [fast]
    for k in range(inner_steps):
        # The last step is the first the backward needs: it stays stored (as in checkpoint_sequential).
        recomputed = recompute and k < inner_steps - 1
        fast = common.checkpoint(step, fast, k) if recomputed else step(fast, k)
        trajectory.append(fast)
    return trajectory


def split_params(params: dict[str, torch.Tensor], inner_steps: int, inner_lr: float, per_step_bn: bool):
    """params -> (adapted θ, per-step BN, LSLR rates, φ without its prefix); fixed rates: [inner_lr] * K."""
    bn = {name: p for name, p in params.items() if per_step_bn and name.startswith(BN)}
    theta = {name: p for name, p in params.items()
             if not name.startswith((COLEARNER, LSLR)) and name not in bn}
    lslr = {name: params.get(LSLR + name, [inner_lr] * inner_steps) for name in theta}
    return theta, bn, lslr, {name.removeprefix(COLEARNER): p for name, p in params.items() if name.startswith(COLEARNER)}


def msl_weights(epoch: int, inner_steps: int, msl_epochs: int) -> list[float] | None:
    """MSL weights w_1..w_K of the query losses at θ_1..θ_K in this epoch (as the reference); None: final step only."""
    if epoch >= msl_epochs:  # also msl_epochs = 0: MSL off
        return None
    start, floor = 1 / inner_steps, MSL_FLOOR / inner_steps
    decay = start / msl_epochs  # per epoch
    earlier = max(start - epoch * decay, floor)
    final = min(start + epoch * (inner_steps - 1) * decay, 1 - (inner_steps - 1) * floor)
    return [earlier] * (inner_steps - 1) + [final]


def cosine_lr(epoch: int, *, epochs: int, outer_lr: float, min_outer_lr: float) -> float:
    """This epoch's outer learning rate: CosineAnnealingLR(T_max=epochs, eta_min=min_outer_lr) stepped per epoch."""
    return min_outer_lr + (outer_lr - min_outer_lr) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def add_grads(totals: list[torch.Tensor | None], new: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
    """Element-wise sums of two lists of gradients, None meaning no gradient."""
    return [t if g is None else g if t is None else t + g for t, g in zip(totals, new)]


def prepool_features(net: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images -> (N, filters, h, w): conv4_features' ops, the last block stopped before its pooling."""
    blocks = common.conv4_blocks(net)
    for i in range(blocks):
        x = F.conv2d(x, net[f"conv{i}.weight"], net[f"conv{i}.bias"], padding=common.CONV_KERNEL // 2)
        x = F.relu(common.batch_norm(x, net[f"bn{i}.weight"], net[f"bn{i}.bias"]))
        if i < blocks - 1:
            x = common.max_pool(x)
    return x


def colearner_forward(phi: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """φ on a pre-pooling feature map (N, filters, h, w) -> (N, ways) logits."""
    for i in range(sum(name.startswith("conv") and name.endswith(".weight") for name in phi)):
        z = F.conv2d(z, phi[f"conv{i}.weight"], phi[f"conv{i}.bias"], padding=common.CONV_KERNEL // 2)
        z = F.relu(common.batch_norm(z, phi[f"bn{i}.weight"], phi[f"bn{i}.bias"]))
    z = common.max_pool(z)  # only the last block pools: (N, filters, h // 2, w // 2)
    return F.linear(z.flatten(1), phi["head.weight"], phi["head.bias"])


def colearner_init(net: dict[str, torch.Tensor], generator: torch.Generator,
                   blocks: int = 2) -> dict[str, torch.Tensor]:
    """φ for a Conv4 θ: `blocks` conv blocks and a linear layer; Xavier-uniform conv and linear weights, zero
    biases, BN scale 1 and shift 0."""
    head = net["head.weight"]  # (ways, filters·h'·w'), the same input size as φ's linear layer
    filters, kw = net["bn0.weight"].shape[-1], dict(dtype=head.dtype)
    phi = {}
    for i in range(blocks):
        w = torch.empty(filters, filters, common.CONV_KERNEL, common.CONV_KERNEL, **kw)
        phi[f"conv{i}.weight"] = torch.nn.init.xavier_uniform_(w, generator=generator)
        phi[f"conv{i}.bias"] = torch.zeros(filters, **kw)
        phi[f"bn{i}.weight"] = torch.ones(filters, **kw)
        phi[f"bn{i}.bias"] = torch.zeros(filters, **kw)
    phi["head.weight"] = torch.nn.init.xavier_uniform_(torch.empty(head.shape, **kw), generator=generator)
    phi["head.bias"] = torch.zeros(head.shape[0], **kw)
    return {COLEARNER + name: p for name, p in phi.items()}


def meta_gradient(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, epoch: int, *, base: str,
                  gamma: float, inner_steps: int, inner_lr: float, per_step_bn: bool, first_order: bool,
                  msl_epochs: int, first_order_epochs: int, clip_grad: float, use_vmap: bool,
                  recompute: bool = False, grad_stats_every: int = 1) -> common.StepResult:
    """One meta-iteration: the base's adaptation and query loss, plus γ · the co-learner's query loss.

    g_meta and g_co (the two losses' meta-gradients w.r.t. the base's parameters) are backpropagated through
    the inner loop apart, for the logged gradient agreement, on every grad_stats_every-th meta-iteration of
    an epoch (the first included); on the others, g_meta + γ g_co in one backward: the same sum, half the work.
    """
    theta, bn, lslr, phi = split_params(params, inner_steps, inner_lr, per_step_bn)
    net = {name: p for name, p in params.items() if not name.startswith(COLEARNER)}  # the base's: θ, BN, LSLR
    weights = msl_weights(epoch, inner_steps, msl_epochs) if base == "mamlpp" else None  # None: the final step only
    steps = range(1, inner_steps + 1) if weights is not None else [inner_steps]
    create_graph = not first_order if base == "maml" else epoch >= first_order_epochs
    num_tasks = tasks.x_s.shape[0]
    # Tasks are independent: on the loop path one task at a time gives the same sums with 1/T of the memory.
    groups = [slice(None)] if use_vmap else [slice(t, t + 1) for t in range(num_tasks)]
    same_epoch = state["epoch"] == epoch
    steps_done = state["steps"] if same_epoch else 0  # meta-iterations of this epoch so far
    apart = grad_stats_every > 0 and steps_done % grad_stats_every == 0  # g_meta and g_co apart this time
    loss_meta, loss_co, correct = 0.0, 0.0, 0.0
    g_meta, g_co, g_phi = [None] * len(net), [None] * len(net), [None] * len(phi)
    for group in groups:
        trajectory = inner_loop(theta, bn, lslr, tasks.x_s[group], tasks.y_s[group], inner_steps=inner_steps,
                                create_graph=create_graph, use_vmap=use_vmap, recompute=recompute)
        # The base's query loss (1/T) Σ_t L_t^meta at θ_{t,j} with BN row j, MSL: Σ_j w_j L(θ_j), and its gradient
        # w.r.t. the weights of each step, as maml_gs.py / mamlpp_gs.py compute them.
        outputs, grad_outputs = [], []
        for j, weight in zip(steps, weights or [1.0]):
            at_step = step_weights(trajectory[j], bn, j)
            step_loss, step_acc, d_step = common.query_loss_grads(at_step, tasks.x_q[group], tasks.y_q[group],
                                                                  weight / num_tasks, use_vmap)
            outputs, grad_outputs = outputs + list(at_step.values()), grad_outputs + list(d_step.values())
            loss_meta = loss_meta + step_loss
        # (1/T) Σ_t L_t^co at θ_{t,K} (BN row K): its gradient w.r.t. the adapted weights (as leaves) and φ, then
        # through the inner loop to θ. Same shapes as the base's: logits (tasks, ways*queries, ways).
        final = step_weights(trajectory[-1], bn, inner_steps)
        adapted = {name: w.detach().requires_grad_() for name, w in final.items()}
        co_logits = common.forward_tasks(lambda w, x: colearner_forward(phi, prepool_features(w, x)), adapted,
                                         tasks.x_q[group], use_vmap)
        co = F.cross_entropy(co_logits.flatten(0, 1), tasks.y_q[group].flatten(), reduction="sum") \
            / (tasks.y_q.shape[1] * num_tasks)
        d_co = torch.autograd.grad(co, list(adapted.values()) + list(phi.values()), allow_unused=True,
                                   materialize_grads=True)  # the adapted head is unused: zeros
        g_phi = add_grads(g_phi, d_co[len(adapted):])
        if apart:  # two backwards through the inner loop: g_meta and g_co each
            g_meta = add_grads(g_meta, torch.autograd.grad(outputs, list(net.values()), grad_outputs,
                                                           allow_unused=True, retain_graph=True))
            g_co = add_grads(g_co, torch.autograd.grad(list(final.values()), list(net.values()), d_co[:len(adapted)],
                                                       allow_unused=True))
        else:  # one: g_meta + γ g_co, the co-learner's part entering as γ · its gradient w.r.t. θ_{t,K}
            g_meta = add_grads(g_meta, torch.autograd.grad(
                outputs + list(final.values()), list(net.values()),
                grad_outputs + [gamma * d for d in d_co[:len(adapted)]], allow_unused=True))
        loss_co, correct = loss_co + co.detach(), correct + step_acc.sum()  # accuracy: the meta-learner's, at θ_{t,K}
    # g = g_meta + γ g_co: with γ = 0 exactly the base's meta-gradient (x + 0 = x).
    grads = {name: None if gm is None else gm + gamma * gc if gc is not None else gm
             for name, gm, gc in zip(net, g_meta, g_co)}
    if clip_grad > 0:  # as mamlpp_gs.py: the network's meta-gradients only, not the LSLR rates (nor φ)
        grads = {name: g.clamp(-clip_grad, clip_grad) if g is not None and (name in theta or name in bn) else g
                 for name, g in grads.items()}
    grads.update({COLEARNER + name: gamma * g for name, g in zip(phi, g_phi)})
    step_stats = {"loss_meta": loss_meta, "loss_co": loss_co}
    if apart:  # gradient agreement on the extractor (conv and BN tensors of θ), flattened: cosine and norm ratio
        extractor = [i for i, name in enumerate(net) if name.startswith(EXTRACTOR)]
        flat_meta = torch.cat([g_meta[i].flatten() for i in extractor])
        flat_co = torch.cat([g_co[i].flatten() for i in extractor])
        step_stats.update(grad_cos=F.cosine_similarity(flat_meta, flat_co, dim=0),
                          grad_norm_ratio=flat_co.norm() / flat_meta.norm())
    # Epoch means from sums kept per epoch, as lwdgh.py: only finite steps are kept by the loop. "steps" counts
    # the meta-iterations (LOSS_STATS), "stat_steps" those with GRAD_STATS.
    sums = {name: state["sums"][name] if same_epoch and name in state["sums"] else 0 for name in STATS}
    sums.update({name: sums[name] + value.detach() for name, value in step_stats.items()})
    new_state = {"epoch": epoch, "steps": steps_done + 1,
                 "stat_steps": (state.get("stat_steps", 0) if same_epoch else 0) + apart, "sums": sums}
    return common.StepResult(loss_meta + gamma * loss_co, correct / num_tasks, grads, new_state)


def predict(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, *,
            inner_steps: int, inner_lr: float, per_step_bn: bool, use_vmap: bool) -> torch.Tensor:
    """The base method's prediction, by the meta-learner only (no φ): query logits (tasks, ways*queries, ways)."""
    theta, bn, lslr, _ = split_params({name: p.detach().requires_grad_() for name, p in params.items()},
                                      inner_steps, inner_lr, per_step_bn)
    with torch.enable_grad():
        trajectory = inner_loop(theta, bn, lslr, tasks.x_s, tasks.y_s, inner_steps=inner_steps, create_graph=False,
                                use_vmap=use_vmap)
    with torch.no_grad():
        return common.forward_tasks(common.conv4_forward, step_weights(trajectory[-1], bn, inner_steps), tasks.x_q,
                                    use_vmap)


def scalars(params: dict[str, torch.Tensor], state: dict) -> dict[str, float]:
    """The base's own number (MAML++: mean LSLR rate over tensors and steps) and the epoch means of STATS."""
    values = {}
    rates = [p.detach() for name, p in params.items() if name.startswith(LSLR)]
    if rates:
        values.update(lslr_mean=torch.stack(rates).mean().item())  # (adapted tensors, K)
    means = {name: (state["sums"][name] / state["steps"]).item() if state["steps"] else math.nan for name in LOSS_STATS}
    means.update({name: (state["sums"][name] / state["stat_steps"]).item() if state.get("stat_steps") else math.nan
                  for name in GRAD_STATS})
    return {**values, **means}


def make_algorithm(args: Args, image_shape: tuple[int, int, int], device: torch.device) -> common.Algorithm:
    """θ from the seed; mamlpp: BN rows as its BN, LSLR rates --inner-lr; φ from its own seed; no statistics yet."""
    mamlpp = args.base == "mamlpp"
    per_step_bn = mamlpp and args.per_step_bn  # the maml base: BN in θ, adapted
    theta = common.conv4_init(image_shape, args.ways, args.filters, generator=torch.Generator().manual_seed(args.seed))
    params = dict(theta)
    if per_step_bn:  # K+1 copies of conv4_init's BN scale 1 and shift 0, in place of the (C,) tensors
        params.update({name: p.expand(args.inner_steps + 1, *p.shape).clone() for name, p in theta.items()
                       if name.startswith(BN)})
    if mamlpp and args.lslr:
        adapted = [name for name in params if not (per_step_bn and name.startswith(BN))]
        params.update({LSLR + name: torch.full((args.inner_steps,), args.inner_lr) for name in adapted})
    params.update(colearner_init(params, torch.Generator().manual_seed(args.seed + COLEARNER_SEED_OFFSET),
                                  args.colearner_blocks))
    params = {name: p.to(device).requires_grad_() for name, p in params.items()}
    vmap = common.use_vmap(args.vmap, device)
    inner = dict(inner_steps=args.inner_steps, inner_lr=args.inner_lr, per_step_bn=per_step_bn, use_vmap=vmap)
    state = {"epoch": -1, "steps": 0, "stat_steps": 0, "sums": {}}  # epoch −1: the first meta-iteration starts its epoch's sums
    return common.Algorithm(
        name=f"cml_{args.base}", params=params, state=state,
        meta_gradient=partial(meta_gradient, base=args.base, gamma=args.gamma, first_order=args.first_order,
                              msl_epochs=args.msl_epochs, first_order_epochs=args.first_order_epochs,
                              clip_grad=args.clip_grad, recompute=args.recompute,
                              grad_stats_every=args.grad_stats_every, **inner),
        predict=partial(predict, **inner), scalars=scalars,
        outer_lr=partial(cosine_lr, epochs=args.epochs, outer_lr=args.outer_lr, min_outer_lr=args.min_outer_lr)
        if mamlpp and args.cosine else None)


if __name__ == "__main__":
    common.main(Args, make_algorithm, description=__doc__.splitlines()[0])

"""MAML++, with and without gradient sharing.

Papers: O. Chang and H. Lipson, "Accelerating Meta-Learning by Sharing Gradients", arXiv 2312.08398:
Algorithm 1 (meta-training) and Algorithm 2 (meta-testing), applied to MAML++ (A. Antoniou, H. Edwards and
A. Storkey, "How to train your MAML", arXiv 1810.09502; reference code AntreasAntoniou/HowToTrainYourMAMLPytorch).
With --no-gs this file is plain MAML++; with every MAML++ feature switched off (--no-lslr --no-per-step-bn
--msl-epochs 0 --first-order-epochs 0 --no-cosine --clip-grad 0) it is exactly maml_gs.py (tested).

Gradient sharing at inner step k = 1..K, for the T tasks of a batch (names in `inner_step`):
    g_k     = Σ_t ∇L_t(θ_{t,k-1}) / ‖Σ_t ∇L_t(θ_{t,k-1})‖₂          (Eq. 1)  `total`, `norm`: one global L2 norm
    ĝ_k     = g_k                        on the first meta-iteration (Eq. 2)  `ghat` is None before it
    ĝ_k     = σ(m_k) g_k + (1 − σ(m_k)) ĝ_k^old           afterwards (Eq. 3)  `ghat_k`; ĝ^old stored, detached
    Δ_{t,k} = σ(λ_k) ĝ_k + (1 − σ(λ_k)) ∇L_t(θ_{t,k-1})               (Eq. 4)  `delta`
    θ_{t,k} = θ_{t,k-1} − α_{k,p} Δ_{t,k} for each tensor p (MAML++ LSLR)  `fast`, α_{k,p} = `lslr[p][k]`
MAML++ (each feature has its flag; in parentheses the code name):
    LSLR   a learned inner learning rate per adapted tensor per step, (K,), init --inner-lr  (`lslr.<name>`)
    BNWB   per-step BatchNorm scale and shift, (K, C) per block: row k serves the support forward of step k+1
           and the query forward after it (k = 0..K−1, the reference's num_step); outer loop only  (`bn`, `bn_rows`)
    MSL    L = Σ_j w_j(epoch) (1/T) Σ_t L_t^query(θ_{t,j}) over j = 1..K while epoch < --msl-epochs,
           then the final step j = K only  (`msl_weights`)
    DA     first order while epoch < --first-order-epochs, second order afterwards  (`meta_gradient`)
    CA     cosine annealing of the outer learning rate from --outer-lr to --min-outer-lr over --epochs  (`cosine_lr`)
    clamp  each meta-gradient element of the network (θ, BN) to ±--clip-grad  (`meta_gradient`)
Outer step: Adam on (θ, BN, LSLR, m, λ) with the loss above (Eq. 5 with MSL)   `meta_gradient`
Meta-validation and meta-test (Algorithm 2) use the stored ĝ_k and never change it  `predict`

Decisions (reference = the MAML++ code): g_k and ĝ_k span the tensors the inner loop adapts, so not the
per-step BN tensors; m, λ ∈ R^K start at 0 (σ = 0.5); m gets no gradient on the first meta-iteration. MSL
weights as the reference's get_per_step_loss_importance_vector: 1/K each at epoch 0, the non-final ones fall
by (1/K)/msl_epochs per epoch to at least 0.03/K, the final one grows by (K−1)(1/K)/msl_epochs per epoch to
at most 1 − (K−1)·0.03/K; training only. --first-order-epochs N gives N first-order epochs (the reference's
first_order_to_second_order_epoch = N − 1); 0, the default, as the reference's configs (−1). --min-outer-lr
1e-5 is the reference parser's default; its released MiniImagenet configs set min_learning_rate 0.001 = the
outer lr, i.e. no annealing in effect, and so do Table 1's rows here (`make reproduce-table1`: --min-outer-lr
0.001, on CUB too, for which the reference ships no config); the cosine is stepped per epoch, as the
reference's CosineAnnealingLR(T_max=total epochs). The
reference clamps to ±10 the network's meta-gradients (not the LSLR rates) on ImageNet-like data only: here
--clip-grad 10 on MiniImagenet, off elsewhere; m, λ and LSLR are never clamped. Per-step BN: K rows, as the
reference's MetaBatchNormLayer indexed by num_step. LSLR rates: K per tensor (the reference allocates K+1,
the last unused). With --no-per-step-bn the BN scale and shift are single θ tensors, meta-learned by the
outer loop only like every BN tensor of this project (the reference's MAML configs:
enable_inner_loop_optimizable_bn_params false); --adapt-bn adapts them in the inner loop as well.

How it runs: `common.main` parses `Args` and calls `common.run`, which builds the meta-parameters with
`make_algorithm`, then for every meta-iteration calls `meta_gradient` on a batch of tasks and steps Adam with
its gradients (carrying its `state`, the stored ĝ, and averaging its `metrics` per epoch; each epoch's learning
rate from `cosine_lr`), and evaluates `predict` on fixed validation tasks after every epoch and on the test
tasks at the end (the top-5 ensemble). Conv4 only (--backbone): per-step BN rows are Conv4's, as MAML++'s.

Reproduces arXiv 2312.08398, Table 1 (5-way 5-shot), rows MAML++/5 and MAML++/1 (task batch 5 and 1),
columns ORIGINAL (--no-gs) and GRADSHARE (--gs); CUB: 150 epochs (task batch 5) or 750 (task batch 1),
MiniImagenet: 250 or 1250, with --clip-grad 10; --min-outer-lr 0.001 (above). E.g. (and with --no-gs)
    python mamlpp_gs.py --dataset miniimagenet --shots 5 --tasks 5 --epochs 250 --clip-grad 10 --min-outer-lr 0.001 --gs
`make reproduce-table1` runs every row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

import common


@dataclass
class Args(common.Args):
    gs: bool = True
    """gradient sharing (--gs), or none (--no-gs)"""
    inner_steps: int = 5
    """inner-loop steps K, at meta-training and meta-test"""
    inner_lr: float = 0.1
    """inner-loop learning rate α: the initial value of every LSLR rate (the fixed rate with --no-lslr)"""
    lslr: bool = True
    """learn an inner learning rate per adapted tensor per step (LSLR), or use --inner-lr throughout"""
    per_step_bn: bool = True
    """per-step BatchNorm scale and shift, learned by the outer loop only, or one adapted like θ as in MAML"""
    msl_epochs: int = 15
    """epochs with the multi-step loss (MSL) over every inner step; 0: the final step only, always"""
    first_order_epochs: int = 0
    """epochs of first-order meta-gradients before second order (derivative-order annealing); 0: off"""
    cosine: bool = True
    """cosine annealing of the outer learning rate from --outer-lr to --min-outer-lr over --epochs"""
    min_outer_lr: float = 1e-5
    """outer learning rate at the end of the cosine annealing"""
    clip_grad: float = 0.0
    """clamp each meta-gradient element of the network to ±this value; 0: off"""
    recompute: bool = False
    """gradient checkpointing: recompute the query pass and each inner step but the last in the backward pass"""
    backbones = ("conv4",)  # its per-step BN rows are Conv4's blocks' (and the reference's network is Conv4)

    def check(self) -> list[str]:
        problems = super().check()
        if self.inner_steps < 1:
            problems.append(f"--inner-steps must be a positive integer, got {self.inner_steps}")
        if not self.inner_lr > 0:
            problems.append(f"--inner-lr must be positive, got {self.inner_lr}")
        for name in ("msl_epochs", "first_order_epochs", "clip_grad"):
            if not getattr(self, name) >= 0:
                problems.append(f"--{name.replace('_', '-')} must be 0 (off) or positive, got {getattr(self, name)}")
        if self.adapt_bn and self.per_step_bn:
            problems.append("--adapt-bn needs --no-per-step-bn: per-step BN rows are learned by the outer loop only")
        if self.cosine and not 0 <= self.min_outer_lr <= self.outer_lr:
            problems.append(f"--min-outer-lr must lie in [0, --outer-lr = {self.outer_lr}], got {self.min_outer_lr}")
        return problems


GS_PARAMS = ("m", "lambda")  # meta-learned momentum and gate, one per inner step (K,)
LSLR = "lslr."  # lslr.<name>: the learned inner learning rates of adapted tensor <name>, one per step (K,)
BN = common.BN  # Conv4's BatchNorm tensors bn{i}.weight and bn{i}.bias; per-step: (K, C), else (C,)
MSL_FLOOR = 0.03  # MSL: each non-final weight falls to at least MSL_FLOOR / K (the reference's value)


def init_params(args: Args, image_shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """θ (Conv4) from the seed; BN rows as its BN; LSLR rates --inner-lr; with sharing m = λ = 0 (σ = 0.5)."""
    params = common.conv4_init(image_shape, args.ways, args.filters, generator=torch.Generator().manual_seed(args.seed))
    if args.per_step_bn:  # K copies of conv4_init's BN scale 1 and shift 0, in place of the (C,) tensors
        params.update({name: p.expand(args.inner_steps, *p.shape).clone() for name, p in params.items()
                       if name.startswith(BN)})
    if args.lslr:
        adapted, _ = common.split_adapted(params, args.adapt_bn and not args.per_step_bn)
        params.update({LSLR + name: torch.full((args.inner_steps,), args.inner_lr) for name in adapted})
    if args.gs:
        params.update({name: torch.zeros(args.inner_steps) for name in GS_PARAMS})
    return params


def split_params(params: dict[str, torch.Tensor], args: Args):
    """params -> (adapted θ, BN not adapted, LSLR rates, m, λ); fixed rates: [inner_lr] * K; m, λ: None without gs."""
    net = {name: p for name, p in params.items() if name not in GS_PARAMS and not name.startswith(LSLR)}
    theta, bn = common.split_adapted(net, args.adapt_bn and not args.per_step_bn)  # per-step BN: never adapted
    lslr = {name: params.get(LSLR + name, [args.inner_lr] * args.inner_steps) for name in theta}
    return theta, bn, lslr, params.get("m"), params.get("lambda")


def bn_rows(frozen: dict[str, torch.Tensor], step: int, args: Args) -> dict[str, torch.Tensor]:
    """The BN tensors of inner step `step` (from 0) and of the query forward after it, (tasks, C) each: row
    `step` of each per-step BN tensor, or the BN tensors the inner loop leaves alone."""
    return {name: w[:, step] if args.per_step_bn else w for name, w in frozen.items()}


def inner_step(fast: dict[str, torch.Tensor], k: int, rows: dict[str, torch.Tensor], lslr: dict,
               m: torch.Tensor | None, lam: torch.Tensor | None, ghat: list[dict[str, torch.Tensor]] | None,
               x_s: torch.Tensor, y_s: torch.Tensor, args: Args, share: bool, create_graph: bool):
    """Inner step k+1 for every task of the batch, Eq. 1-4 (k counts from 0 here and indexes m, λ, ĝ, LSLR, BN).

    Returns θ_{t,k+1} for every task, (tasks, ...) per tensor, and ĝ_{k+1} (None unless shared).
    """
    grads = common.support_grads(common.conv4_forward, fast, x_s, y_s, create_graph=create_graph,
                                 use_vmap=args.vmap == "on", frozen=rows)  # ∇L_t(θ_{t,k}) with BN row k
    delta, ghat_k = grads, None  # without sharing: Δ_{t,k} = ∇L_t
    if lam is not None and (share or ghat is not None):
        if share:
            total = {name: g.sum(0) for name, g in grads.items()}  # Σ_t ∇L_t
            norm = torch.sqrt(sum(g.square().sum() for g in total.values()))  # over the whole adapted vector
            ghat_k = {name: g / norm for name, g in total.items()}  # Eq. 1: g_k; Eq. 2: ĝ_k = g_k at first
            if ghat is not None:
                momentum = torch.sigmoid(m[k])
                ghat_k = {name: momentum * g + (1 - momentum) * ghat[k][name] for name, g in ghat_k.items()}  # Eq. 3
        gate = torch.sigmoid(lam[k])
        shared = ghat_k if share else ghat[k]  # Algorithm 2 uses the stored running mean, unchanged
        delta = {name: gate * shared[name] + (1 - gate) * g for name, g in grads.items()}  # Eq. 4, ĝ broadcast
    return {name: w - lslr[name][k] * delta[name] for name, w in fast.items()}, ghat_k  # LSLR: per tensor, step


def inner_loop(theta: dict[str, torch.Tensor], bn: dict[str, torch.Tensor], lslr: dict, m: torch.Tensor | None,
               lam: torch.Tensor | None, ghat: list[dict[str, torch.Tensor]] | None, x_s: torch.Tensor,
               y_s: torch.Tensor, args: Args, share: bool, create_graph: bool):
    """Adapt θ to every task of the batch: K inner steps (Algorithm 1 with share=True, Algorithm 2 without).

    bn: the BN tensors not adapted, (K, C) per-step or (C,) ({} with --adapt-bn); lslr: each adapted tensor's
    rates, (K,) or a list of K floats when fixed; x_s (tasks, ways*shots, C, H, W), y_s (tasks, ways*shots); m,
    lam (K,) or None without sharing; ghat the stored ĝ (K dicts like θ) or None before the first meta-iteration.
    Returns the trajectory [θ_{t,0}, ..., θ_{t,K}] (MSL needs every step), each a dict of (tasks, ...)
    tensors, θ_{t,j} (j ≥ 1) with the BN rows of step j's support forward (its query forward's too), and with
    share=True the new ĝ (still attached to the graph: m gets its gradient there).
    --recompute: torch.utils.checkpoint keeps only the inputs of steps 1..K-1 and recomputes each step in
    the backward pass; step K, the first the backward needs, stays stored (the query pass: forward_tasks).
    """
    weights = {name: p.expand(x_s.shape[0], *p.shape) for name, p in {**theta, **bn}.items()}  # (tasks, ...)
    fast, frozen = {name: weights[name] for name in theta}, {name: weights[name] for name in bn}  # θ_{t,0} = θ
    trajectory, new_ghat = [fast], []
    for k in range(args.inner_steps):
        rows = bn_rows(frozen, k, args)
        step_args = (fast, k, rows, lslr, m, lam, ghat, x_s, y_s, args, share, create_graph)
        if args.recompute and k < args.inner_steps - 1:
            fast, ghat_k = torch.utils.checkpoint.checkpoint(inner_step, *step_args, use_reentrant=False)
        else:
            fast, ghat_k = inner_step(*step_args)
        trajectory.append({**fast, **rows})
        new_ghat.append(ghat_k)
    return trajectory, (new_ghat if share and lam is not None else None)


def msl_weights(epoch: int, args: Args) -> list[float] | None:
    """MSL weights w_1..w_K of the query losses at θ_1..θ_K in this epoch (as the reference); None: final step only."""
    if epoch >= args.msl_epochs:  # also msl_epochs = 0: MSL off
        return None
    steps = args.inner_steps
    start, floor = 1 / steps, MSL_FLOOR / steps
    decay = start / args.msl_epochs  # per epoch
    earlier = max(start - epoch * decay, floor)
    final = min(start + epoch * (steps - 1) * decay, 1 - (steps - 1) * floor)
    return [earlier] * (steps - 1) + [final]


def cosine_lr(epoch: int, args: Args) -> float:
    """This epoch's outer learning rate: CosineAnnealingLR(T_max=epochs, eta_min=min_outer_lr) stepped per epoch."""
    return args.min_outer_lr + (args.outer_lr - args.min_outer_lr) * (1 + math.cos(math.pi * epoch / args.epochs)) / 2


def meta_gradient(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, epoch: int,
                  args: Args) -> common.StepResult:
    """One meta-iteration of Algorithm 1 with MAML++: adapt every task; the (multi-step) query loss and its gradient."""
    theta, bn, lslr, m, lam = split_params(params, args)
    trajectory, ghat = inner_loop(theta, bn, lslr, m, lam, state["ghat"], tasks.x_s, tasks.y_s, args, share=True,
                                  create_graph=epoch >= args.first_order_epochs)
    # MSL: Σ_j w_j (1/T) Σ_t L_t^query(θ_{t,j}) with BN row j − 1; else (Eq. 5) the final step's alone
    weights = msl_weights(epoch, args) or [0.0] * (args.inner_steps - 1) + [1.0]
    loss = 0.0
    for j, weight in enumerate(weights, start=1):
        if weight:
            logits = common.forward_tasks(common.conv4_forward, trajectory[j], tasks.x_q, args.vmap == "on",
                                          args.recompute)
            step_loss, acc = common.query_loss(logits, tasks.y_q)  # acc: at θ_{t,K}, the last step
            loss = loss + weight * step_loss
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    if args.clip_grad > 0:  # as the reference: the network's meta-gradients only, not the learning rates, m or λ
        grads = {name: g.clamp(-args.clip_grad, args.clip_grad) if g is not None and (name in theta or name in bn)
                 else g for name, g in grads.items()}
    metrics = {}
    if args.lslr:
        metrics["lslr_mean"] = torch.stack([p.detach() for p in lslr.values()]).mean().item()  # (tensors, K)
    if ghat is not None:
        state = {"ghat": [{name: g.detach() for name, g in ghat_k.items()} for ghat_k in ghat]}
        metrics.update(sigma_m=torch.sigmoid(m).mean().item(), sigma_lambda=torch.sigmoid(lam).mean().item())
    return common.StepResult(loss.detach(), acc, grads, state, metrics)


def predict(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, args: Args) -> torch.Tensor:
    """Algorithm 2: adapt with the stored ĝ (never updated), return query logits (tasks, ways*queries, ways)."""
    detached = {name: p.detach().requires_grad_() for name, p in params.items()}
    theta, bn, lslr, m, lam = split_params(detached, args)
    with torch.enable_grad():
        trajectory, _ = inner_loop(theta, bn, lslr, m, lam, state["ghat"], tasks.x_s, tasks.y_s, args, share=False,
                                   create_graph=False)
    with torch.no_grad():
        return common.forward_tasks(common.conv4_forward, trajectory[-1], tasks.x_q, args.vmap == "on")


def make_algorithm(args: Args, image_shape: tuple[int, int, int], device: torch.device) -> common.Algorithm:
    """The meta-parameters on `device`; no ĝ before the first meta-iteration; the cosine outer lr if on."""
    params = {name: p.to(device).requires_grad_() for name, p in init_params(args, image_shape).items()}
    return common.Algorithm("mamlpp_gs" if args.gs else "mamlpp", params, {"ghat": None}, meta_gradient, predict,
                            outer_lr=cosine_lr if args.cosine else None)


if __name__ == "__main__":
    common.main(Args, make_algorithm, description=__doc__.splitlines()[0])

"""MAML++, with and without gradient sharing.

Papers: O. Chang and H. Lipson, "Accelerating Meta-Learning by Sharing Gradients", arXiv 2312.08398
(shared/papers/002): Algorithm 1 (meta-training) and Algorithm 2 (meta-testing), applied to MAML++
(A. Antoniou, H. Edwards and A. Storkey, "How to train your MAML", ICLR 2019; reference code
AntreasAntoniou/HowToTrainYourMAMLPytorch). With --no-gs this file is plain MAML++; with every MAML++
feature switched off (--no-lslr --no-per-step-bn --msl-epochs 0 --first-order-epochs 0 --no-cosine
--clip-grad 0) it is exactly maml_gs.py (tested).

Gradient sharing at inner step k = 1..K, for the T tasks of a batch (names in `inner_loop`):
    g_k     = Σ_t ∇L_t(θ_{t,k-1}) / ‖Σ_t ∇L_t(θ_{t,k-1})‖₂             (Eq. 1)  `total`, `norm`: one global L2 norm
    ĝ_k     = g_k                        on the first meta-iteration    (Eq. 2)  `ghat` is None before it
    ĝ_k     = σ(m_k) g_k + (1 − σ(m_k)) ĝ_k^old              afterwards (Eq. 3)  `ghat_k`; ĝ^old stored, detached
    Δ_{t,k} = σ(λ_k) ĝ_k + (1 − σ(λ_k)) ∇L_t(θ_{t,k-1})                  (Eq. 4)  `delta`
    θ_{t,k} = θ_{t,k-1} − α_{k,p} Δ_{t,k} for each tensor p   (MAML++ LSLR)  `fast`, α_{k,p} = `lslr[p][k]`
MAML++ (each feature has its flag; in parentheses the code name):
    LSLR   a learned inner learning rate per adapted tensor per step, (K,), init --inner-lr  (`lslr.<name>`)
    BNWB   per-step BatchNorm scale and shift, (K+1, C) per block: row j serves every forward at θ_{t,j},
           j = 0..K (row K: the query forward); learned by the outer loop only, never adapted  (`bn`, `step_weights`)
    MSL    L = Σ_j w_j(epoch) (1/T) Σ_t L_t^query(θ_{t,j}) over j = 1..K while epoch < --msl-epochs,
           then the final step j = K only  (`msl_weights`)
    DA     first order while epoch < --first-order-epochs, second order afterwards  (`meta_gradient`)
    CA     cosine annealing of the outer learning rate from --outer-lr to --min-outer-lr over --epochs  (`cosine_lr`)
    clamp  each meta-gradient element of the network (θ, BN) to ±--clip-grad  (`meta_gradient`)
Outer step: Adam on (θ, BN, LSLR, m, λ) with the loss above (Eq. 5 with MSL)   `meta_gradient`
Meta-validation and meta-test (Algorithm 2) use the stored ĝ_k and never change it  `predict`

Decisions (shared/DESIGN.md; reference = the MAML++ code): g_k and ĝ_k span the tensors the inner loop
adapts, so not the per-step BN tensors; m, λ ∈ R^K start at 0 (σ = 0.5); m gets no gradient on the first
meta-iteration. MSL weights as the reference's get_per_step_loss_importance_vector: 1/K each at epoch 0,
the non-final ones fall by (1/K)/msl_epochs per epoch to at least 0.03/K, the final one grows by
(K−1)(1/K)/msl_epochs per epoch to at most 1 − (K−1)·0.03/K; training only. --first-order-epochs N gives
N first-order epochs (the reference's first_order_to_second_order_epoch = N − 1); 0, the default, as the
reference's configs (−1). --min-outer-lr 1e-5 is the reference parser's default (its released
MiniImagenet configs set 0.001 = the outer lr, i.e. no annealing); the cosine is stepped per epoch, as
the reference's CosineAnnealingLR(T_max=total epochs). The reference clamps to ±10 the network's
meta-gradients (not the LSLR rates) on ImageNet-like data only: here --clip-grad 10 on MiniImagenet, off
elsewhere; m, λ and LSLR are never clamped. Per-step BN: the reference keeps K rows and reuses row k for
the query forward after step k; here row j belongs to the weights θ_j (K+1 rows), so support and query
forwards at the same weights share one BN. LSLR rates: K per tensor (the reference allocates K+1, the
last unused). With --no-per-step-bn the BN scale and shift are ordinary θ tensors, adapted as in MAML.

Reproduces paper 002, Table 1 (5-way 5-shot), rows MAML++/5 and MAML++/1 (method/task batch), columns
ORIGINAL (first command of each pair, --no-gs) and GRADSHARE (second, --gs); the 5-shot panels of the
MAML++ column of Figures 4 and 6 come from the same runs:
    MAML++/5, CUB:
        python mamlpp_gs.py --dataset cub --shots 5 --tasks 5 --epochs 150 --no-gs
        python mamlpp_gs.py --dataset cub --shots 5 --tasks 5 --epochs 150 --gs
    MAML++/1, CUB:
        python mamlpp_gs.py --dataset cub --shots 5 --tasks 1 --epochs 750 --no-gs
        python mamlpp_gs.py --dataset cub --shots 5 --tasks 1 --epochs 750 --gs
    MAML++/5, MiniImagenet:
        python mamlpp_gs.py --dataset miniimagenet --shots 5 --tasks 5 --epochs 250 --clip-grad 10 --no-gs
        python mamlpp_gs.py --dataset miniimagenet --shots 5 --tasks 5 --epochs 250 --clip-grad 10 --gs
    MAML++/1, MiniImagenet:
        python mamlpp_gs.py --dataset miniimagenet --shots 5 --tasks 1 --epochs 1250 --clip-grad 10 --no-gs
        python mamlpp_gs.py --dataset miniimagenet --shots 5 --tasks 1 --epochs 1250 --clip-grad 10 --gs
`make reproduce-table1` runs every row (README, section Reproducing the papers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

import common


@dataclass
class Args(common.Args):
    gs: bool = True
    """gradient sharing (--gs), or plain MAML++ (--no-gs)"""
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
    """gradient checkpointing: recompute each inner step but the last in the backward pass; less memory, more time"""

    def check(self) -> list[str]:
        problems = super().check()
        if self.inner_steps < 1:
            problems.append(f"--inner-steps must be a positive integer, got {self.inner_steps}")
        if not self.inner_lr > 0:
            problems.append(f"--inner-lr must be positive, got {self.inner_lr}")
        for name in ("msl_epochs", "first_order_epochs", "clip_grad"):
            if not getattr(self, name) >= 0:
                problems.append(f"--{name.replace('_', '-')} must be 0 (off) or positive, got {getattr(self, name)}")
        if self.cosine and not 0 <= self.min_outer_lr <= self.outer_lr:
            problems.append(f"--min-outer-lr must lie in [0, --outer-lr = {self.outer_lr}], got {self.min_outer_lr}")
        return problems


GS_PARAMS = ("m", "lambda")  # meta-learned momentum and gate, one per inner step (K,)
LSLR = "lslr."  # lslr.<name>: the learned inner learning rates of adapted tensor <name>, one per step (K,)
BN = "bn"  # Conv4's BatchNorm tensors bn{i}.weight and bn{i}.bias; per-step: (K+1, C), else (C,)
MSL_FLOOR = 0.03  # MSL: each non-final weight falls to at least MSL_FLOOR / K (the reference's value)


def step_weights(fast: dict[str, torch.Tensor], bn: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """The Conv4 parameters of a forward at θ_{t,step}: the fast weights and BN row `step`, each (tasks, ...)."""
    tasks = next(iter(fast.values())).shape[0]
    return {**fast, **{name: p[step].expand(tasks, *p.shape[1:]) for name, p in bn.items()}}


def task_grads(fast: dict[str, torch.Tensor], bn: dict[str, torch.Tensor], k: int, x_s: torch.Tensor,
               y_s: torch.Tensor, *, create_graph: bool, use_vmap: bool) -> dict[str, torch.Tensor]:
    """∇L_t(θ_{t,k}) of every task's support loss w.r.t. its own fast weights, (tasks, ...) per tensor."""
    net = step_weights(fast, bn, k)  # the weights after k updates, with BN row k
    logits = common.forward_tasks(common.conv4_forward, net, x_s, use_vmap)  # (tasks, ways*shots, ways)
    # Σ_t L_t, each L_t a mean over task t's own support set. Tasks share nothing in the forward pass,
    # so one backward gives every task's gradient w.r.t. its own fast weights: ∇L_t, (tasks, ...).
    loss = F.cross_entropy(logits.flatten(0, 1), y_s.flatten(), reduction="sum") / y_s.shape[1]
    return dict(zip(fast, torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)))


def inner_step(fast: dict[str, torch.Tensor], k: int, bn: dict[str, torch.Tensor], lslr: dict[str, torch.Tensor | list],
               m: torch.Tensor | None, lam: torch.Tensor | None, ghat: list[dict[str, torch.Tensor]] | None,
               x_s: torch.Tensor, y_s: torch.Tensor, *, share: bool, create_graph: bool, use_vmap: bool,
               recompute: bool = False):
    """Inner step k+1 for every task of the batch, Eq. 1-4 (k counts from 0 here and indexes m, λ, ĝ).

    Returns θ_{t,k+1} for every task, (tasks, ...) per tensor, and ĝ_{k+1} (None unless shared).
    recompute: gradient checkpointing of ∇L_t (inner_loop's docstring).
    """
    if recompute:  # one region per task on the loop path: the backward recomputes one task at a time
        chunks = [slice(None)] if use_vmap else [slice(t, t + 1) for t in range(x_s.shape[0])]
        parts = [common.checkpoint(task_grads, {name: w[chunk] for name, w in fast.items()}, bn, k, x_s[chunk],
                                   y_s[chunk], create_graph=create_graph, use_vmap=use_vmap)
                 for chunk in chunks]
        grads = {name: torch.cat([part[name] for part in parts]) for name in fast}
    else:
        grads = task_grads(fast, bn, k, x_s, y_s, create_graph=create_graph, use_vmap=use_vmap)
    delta, ghat_k = grads, None  # plain MAML++: Δ_{t,k} = ∇L_t
    if lam is not None and (share or ghat is not None):
        if share:
            total = {name: g.sum(0) for name, g in grads.items()}  # Σ_t ∇L_t
            norm = torch.sqrt(sum(g.square().sum() for g in total.values()))  # over the whole adapted vector
            ghat_k = {name: g / norm for name, g in total.items()}  # Eq. 1: g_k; Eq. 2: ĝ_k = g_k on the first iteration
            if ghat is not None:
                momentum = torch.sigmoid(m[k])
                ghat_k = {name: momentum * g + (1 - momentum) * ghat[k][name] for name, g in ghat_k.items()}  # Eq. 3
        gate = torch.sigmoid(lam[k])
        shared = ghat_k if share else ghat[k]  # Algorithm 2 uses the stored running mean, unchanged
        delta = {name: gate * shared[name] + (1 - gate) * g for name, g in grads.items()}  # Eq. 4, ĝ broadcast over tasks
    return {name: w - lslr[name][k] * delta[name] for name, w in fast.items()}, ghat_k  # LSLR: a rate per tensor, step


def inner_loop(theta: dict[str, torch.Tensor], bn: dict[str, torch.Tensor], lslr: dict[str, torch.Tensor | list],
               m: torch.Tensor | None, lam: torch.Tensor | None, ghat: list[dict[str, torch.Tensor]] | None,
               x_s: torch.Tensor, y_s: torch.Tensor, *, inner_steps: int, share: bool, create_graph: bool,
               use_vmap: bool, recompute: bool = False):
    """Adapt θ to every task of the batch: K inner steps (Algorithm 1 with share=True, Algorithm 2 without).

    theta: the initialisation of the adapted tensors; bn: the per-step BN tensors (K+1, C), or {} when BN
    is in theta; lslr: each adapted tensor's rates, (K,) or a list of K floats when fixed; x_s (tasks,
    ways*shots, C, H, W), y_s (tasks, ways*shots). m, lam: (K,) or None for plain MAML++. ghat: the
    stored ĝ (K dicts like theta) or None before the first meta-iteration. Returns the trajectory
    [θ_{t,0}, ..., θ_{t,K}] (MSL needs every step), each a dict of (tasks, ...) tensors, and with
    share=True the new ĝ (K dicts, still attached to the graph: m gets its gradient there).
    recompute: gradient checkpointing. Each task's ∇L_t at steps 1..K-1 (its support forward and backward,
    the activations) is not kept but recomputed in the backward pass, one task at a time on the loop path;
    what couples the tasks (g_k, ĝ_k, Δ: parameter-sized) and step K stay stored. The same gradients, with
    the activations of step K and one task's step, for one more support forward-backward per earlier step.
    """
    tasks = x_s.shape[0]
    fast = {name: p.expand(tasks, *p.shape) for name, p in theta.items()}  # θ_{t,0} = θ, (tasks, ...)
    step = partial(inner_step, bn=bn, lslr=lslr, m=m, lam=lam, ghat=ghat, x_s=x_s, y_s=y_s, share=share,
                   create_graph=create_graph, use_vmap=use_vmap)
    trajectory, new_ghat = [fast], []
    for k in range(inner_steps):
        # The last step is the first the backward needs: it stays stored (as in checkpoint_sequential).
        fast, ghat_k = step(fast, k, recompute=recompute and k < inner_steps - 1)
        trajectory.append(fast)
        new_ghat.append(ghat_k)
    return trajectory, (new_ghat if share and lam is not None else None)


def split_params(params: dict[str, torch.Tensor], inner_steps: int, inner_lr: float, per_step_bn: bool):
    """params -> (adapted θ, per-step BN, LSLR rates, m, λ); fixed rates: [inner_lr] * K; m, λ: None without gs."""
    bn = {name: p for name, p in params.items() if per_step_bn and name.startswith(BN)}
    theta = {name: p for name, p in params.items()
             if name not in GS_PARAMS and not name.startswith(LSLR) and name not in bn}
    lslr = {name: params.get(LSLR + name, [inner_lr] * inner_steps) for name in theta}
    return theta, bn, lslr, params.get("m"), params.get("lambda")


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


def meta_gradient(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, epoch: int, *,
                  inner_steps: int, inner_lr: float, per_step_bn: bool, msl_epochs: int, first_order_epochs: int,
                  clip_grad: float, use_vmap: bool, recompute: bool = False) -> common.StepResult:
    """One meta-iteration of Algorithm 1 with MAML++: adapt every task, (multi-step) query loss, its gradient."""
    theta, bn, lslr, m, lam = split_params(params, inner_steps, inner_lr, per_step_bn)
    weights = msl_weights(epoch, inner_steps, msl_epochs)  # w_1..w_K, or None: the final step only
    steps = range(1, inner_steps + 1) if weights is not None else [inner_steps]
    num_tasks = tasks.x_s.shape[0]
    # With sharing, g_k couples the tasks: they adapt and are differentiated together. Without, they are
    # independent, and on the loop path one task at a time gives the same sum with 1/T of the memory.
    groups = [slice(None)] if lam is not None or use_vmap else [slice(t, t + 1) for t in range(num_tasks)]
    loss, correct, grads = 0.0, 0.0, [None] * len(params)
    for group in groups:
        trajectory, ghat = inner_loop(theta, bn, lslr, m, lam, state["ghat"], tasks.x_s[group], tasks.y_s[group],
                                      inner_steps=inner_steps, share=True, create_graph=epoch >= first_order_epochs,
                                      use_vmap=use_vmap, recompute=recompute)
        # (1/T) Σ_t L_t^query (Eq. 5) at θ_{t,j} with BN row j, MSL: Σ_j w_j L(θ_j), and its gradient w.r.t. the
        # weights of each step, one task at a time (memory); then one backward through the inner loop to every
        # meta-parameter (m gets none on the first iteration).
        outputs, grad_outputs = [], []
        for j, weight in zip(steps, weights or [1.0]):
            at_step = step_weights(trajectory[j], bn, j)
            step_loss, step_acc, d_step = common.query_loss_grads(at_step, tasks.x_q[group], tasks.y_q[group],
                                                                  weight / num_tasks, use_vmap)
            outputs += list(at_step.values())
            grad_outputs += list(d_step.values())
            loss = loss + step_loss
        group_grads = torch.autograd.grad(outputs, list(params.values()), grad_outputs, allow_unused=True)
        grads = [total if g is None else g if total is None else total + g for total, g in zip(grads, group_grads)]
        correct = correct + step_acc.sum()  # at θ_{t,K}, the last step
    grads = dict(zip(params, grads))
    if clip_grad > 0:  # as the reference: the network's meta-gradients only, not the learning rates, m or λ
        grads = {name: g.clamp(-clip_grad, clip_grad) if g is not None and (name in theta or name in bn) else g
                 for name, g in grads.items()}
    if ghat is not None:
        state = {"ghat": [{name: g.detach() for name, g in ghat_k.items()} for ghat_k in ghat]}
    return common.StepResult(loss, correct / num_tasks, grads, state)


def predict(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, *,
            inner_steps: int, inner_lr: float, per_step_bn: bool, use_vmap: bool) -> torch.Tensor:
    """Algorithm 2: adapt with the stored ĝ (never updated), return query logits (tasks, ways*queries, ways)."""
    theta, bn, lslr, m, lam = split_params({name: p.detach().requires_grad_() for name, p in params.items()},
                                           inner_steps, inner_lr, per_step_bn)
    with torch.enable_grad():
        trajectory, _ = inner_loop(theta, bn, lslr, m, lam, state["ghat"], tasks.x_s, tasks.y_s,
                                   inner_steps=inner_steps, share=False, create_graph=False, use_vmap=use_vmap)
    with torch.no_grad():
        return common.forward_tasks(common.conv4_forward, step_weights(trajectory[-1], bn, inner_steps), tasks.x_q,
                                    use_vmap)


def scalars(params: dict[str, torch.Tensor], state: dict) -> dict[str, float]:
    """Mean σ(m_k) and σ(λ_k) over k (the paper's Figures 3, 5, 7, 9, 11); mean LSLR rate over tensors and steps."""
    values = {}
    if "m" in params:
        values.update(sigma_m=torch.sigmoid(params["m"]).mean().item(),
                      sigma_lambda=torch.sigmoid(params["lambda"]).mean().item())
    rates = [p.detach() for name, p in params.items() if name.startswith(LSLR)]
    if rates:
        values.update(lslr_mean=torch.stack(rates).mean().item())  # (adapted tensors, K)
    return values


def make_algorithm(args: Args, image_shape: tuple[int, int, int], device: torch.device) -> common.Algorithm:
    """θ from the seed; BN rows as its BN, LSLR rates --inner-lr; m = λ = 0 (σ = 0.5) with sharing; no ĝ yet."""
    theta = common.conv4_init(image_shape, args.ways, args.filters, generator=torch.Generator().manual_seed(args.seed))
    params = dict(theta)
    if args.per_step_bn:  # K+1 copies of conv4_init's BN scale 1 and shift 0, in place of the (C,) tensors
        params.update({name: p.expand(args.inner_steps + 1, *p.shape).clone() for name, p in theta.items()
                       if name.startswith(BN)})
    if args.lslr:
        adapted = [name for name in params if not (args.per_step_bn and name.startswith(BN))]
        params.update({LSLR + name: torch.full((args.inner_steps,), args.inner_lr) for name in adapted})
    if args.gs:
        params.update({name: torch.zeros(args.inner_steps) for name in GS_PARAMS})
    params = {name: p.to(device).requires_grad_() for name, p in params.items()}
    vmap = common.use_vmap(args.vmap, device)
    inner = dict(inner_steps=args.inner_steps, inner_lr=args.inner_lr, per_step_bn=args.per_step_bn, use_vmap=vmap)
    return common.Algorithm(
        name="mamlpp_gs" if args.gs else "mamlpp", params=params, state={"ghat": None},
        meta_gradient=partial(meta_gradient, msl_epochs=args.msl_epochs, first_order_epochs=args.first_order_epochs,
                              clip_grad=args.clip_grad, recompute=args.recompute, **inner),
        predict=partial(predict, **inner), scalars=scalars,
        outer_lr=partial(cosine_lr, epochs=args.epochs, outer_lr=args.outer_lr, min_outer_lr=args.min_outer_lr)
        if args.cosine else None)


if __name__ == "__main__":
    common.main(Args, make_algorithm, description=__doc__.splitlines()[0])

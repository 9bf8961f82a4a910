"""Meta-SGD, with and without gradient sharing.

Papers: O. Chang and H. Lipson, "Accelerating Meta-Learning by Sharing Gradients", arXiv 2312.08398
(shared/papers/002): Algorithm 1 (meta-training) and Algorithm 2 (meta-testing), applied to Meta-SGD
(Z. Li, F. Zhou, F. Chen and H. Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
arXiv 1707.09835). With --no-gs this file is plain second-order Meta-SGD. The only difference from
maml_gs.py: the inner learning rate α is a meta-learned tensor per parameter tensor, same shape, and
the update multiplies elementwise.

Gradient sharing at inner step k = 1..K, for the T tasks of a batch (names in `inner_loop`):
    g_k     = Σ_t ∇L_t(θ_{t,k-1}) / ‖Σ_t ∇L_t(θ_{t,k-1})‖₂             (Eq. 1)  `total`, `norm`: one global L2 norm
    ĝ_k     = g_k                        on the first meta-iteration    (Eq. 2)  `ghat` is None before it
    ĝ_k     = σ(m_k) g_k + (1 − σ(m_k)) ĝ_k^old              afterwards (Eq. 3)  `ghat_k`; ĝ^old stored, detached
    Δ_{t,k} = σ(λ_k) ĝ_k + (1 − σ(λ_k)) ∇L_t(θ_{t,k-1})                  (Eq. 4)  `delta`
    θ_{t,k} = θ_{t,k-1} − α ⊙ Δ_{t,k}                           (Meta-SGD)   `fast`, α = `alpha`, shaped as θ
Outer step: Adam on (θ, α, m, λ) with the loss (1/T) Σ_t L_t^query(θ_{t,K})   (Eq. 5)  `meta_gradient`
Meta-validation and meta-test (Algorithm 2) use the stored ĝ_k and never change it  `predict`

Decisions where the papers are silent (shared/DESIGN.md): every element of α starts at --inner-lr (0.1,
as paper 002 A.3 and its discussion of Meta-SGD: the same value for every entry, for a fair comparison
with MAML) and is unconstrained (it may turn negative, as in Li et al.); --no-learn-alpha keeps α fixed
at --inner-lr, which is exactly MAML (tested); m, λ ∈ R^K start at 0 (σ = 0.5); second order by
default, so the meta-gradient flows through g_k, its norm and the task gradients; m gets no gradient on
the first meta-iteration (ĝ = g there); every Conv4 tensor (BatchNorm scale and shift included) is
adapted, as in MAML; before any ĝ is stored, evaluation uses the plain gradient. Logged per epoch: the
mean and standard deviation of all elements of α (`alpha_mean`, `alpha_std`), next to σ(m) and σ(λ).

Reproduces paper 002, Table 1 (5-way 5-shot), rows Meta-SGD/5 and Meta-SGD/1 (method/task batch), columns
ORIGINAL (first command of each pair, --no-gs) and GRADSHARE (second, --gs); the 5-shot panels of the
Meta-SGD column of Figures 4 and 6 come from the same runs:
    Meta-SGD/5, CUB:
        python metasgd_gs.py --dataset cub --shots 5 --tasks 5 --epochs 150 --no-gs
        python metasgd_gs.py --dataset cub --shots 5 --tasks 5 --epochs 150 --gs
    Meta-SGD/1, CUB:
        python metasgd_gs.py --dataset cub --shots 5 --tasks 1 --epochs 750 --no-gs
        python metasgd_gs.py --dataset cub --shots 5 --tasks 1 --epochs 750 --gs
    Meta-SGD/5, MiniImagenet:
        python metasgd_gs.py --dataset miniimagenet --shots 5 --tasks 5 --epochs 250 --no-gs
        python metasgd_gs.py --dataset miniimagenet --shots 5 --tasks 5 --epochs 250 --gs
    Meta-SGD/1, MiniImagenet:
        python metasgd_gs.py --dataset miniimagenet --shots 5 --tasks 1 --epochs 1250 --no-gs
        python metasgd_gs.py --dataset miniimagenet --shots 5 --tasks 1 --epochs 1250 --gs
`make reproduce-table1` runs every row (README, section Reproducing the papers).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

import common


@dataclass
class Args(common.Args):
    gs: bool = True
    """gradient sharing (--gs), or plain Meta-SGD (--no-gs)"""
    inner_steps: int = 5
    """inner-loop steps K, at meta-training and meta-test"""
    inner_lr: float = 0.1
    """initial value of every element of the learned inner learning rate α"""
    learn_alpha: bool = True
    """meta-learn α (--learn-alpha), or keep it fixed at --inner-lr, which is MAML (--no-learn-alpha)"""
    first_order: bool = False
    """first-order approximation: no gradient through the inner-loop gradients"""
    recompute: bool = False
    """gradient checkpointing: recompute each inner step but the last in the backward pass; less memory, more time"""

    def check(self) -> list[str]:
        problems = super().check()
        if self.inner_steps < 1:
            problems.append(f"--inner-steps must be a positive integer, got {self.inner_steps}")
        if not self.inner_lr > 0:
            problems.append(f"--inner-lr must be positive, got {self.inner_lr}")
        return problems


GS_PARAMS = ("m", "lambda")  # meta-learned momentum and gate, one per inner step (K,)
ALPHA = "alpha."  # alpha.<name>: the learned inner learning rate of θ tensor <name>, same shape


def task_grads(fast: dict[str, torch.Tensor], x_s: torch.Tensor, y_s: torch.Tensor, *, create_graph: bool,
               use_vmap: bool) -> dict[str, torch.Tensor]:
    """∇L_t(θ_{t,k}) of every task's support loss w.r.t. its own fast weights, (tasks, ...) per tensor."""
    logits = common.forward_tasks(common.conv4_forward, fast, x_s, use_vmap)  # (tasks, ways*shots, ways)
    # Σ_t L_t, each L_t a mean over task t's own support set. Tasks share nothing in the forward pass,
    # so one backward gives every task's gradient w.r.t. its own fast weights: ∇L_t, (tasks, ...).
    loss = F.cross_entropy(logits.flatten(0, 1), y_s.flatten(), reduction="sum") / y_s.shape[1]
    return dict(zip(fast, torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)))


def inner_step(fast: dict[str, torch.Tensor], k: int, alpha: dict[str, torch.Tensor | float], m: torch.Tensor | None,
               lam: torch.Tensor | None, ghat: list[dict[str, torch.Tensor]] | None, x_s: torch.Tensor,
               y_s: torch.Tensor, *, share: bool, create_graph: bool, use_vmap: bool, recompute: bool = False):
    """Inner step k+1 for every task of the batch, Eq. 1-4 (k counts from 0 here and indexes m, λ, ĝ).

    Returns θ_{t,k+1} for every task, (tasks, ...) per tensor, and ĝ_{k+1} (None unless shared).
    recompute: gradient checkpointing of ∇L_t (inner_loop's docstring).
    """
    if recompute:  # one region per task on the loop path: the backward recomputes one task at a time
        chunks = [slice(None)] if use_vmap else [slice(t, t + 1) for t in range(x_s.shape[0])]
        parts = [common.checkpoint(task_grads, {name: w[chunk] for name, w in fast.items()}, x_s[chunk],
                                   y_s[chunk], create_graph=create_graph, use_vmap=use_vmap)
                 for chunk in chunks]
        grads = {name: torch.cat([part[name] for part in parts]) for name in fast}
    else:
        grads = task_grads(fast, x_s, y_s, create_graph=create_graph, use_vmap=use_vmap)
    delta, ghat_k = grads, None  # plain Meta-SGD: Δ_{t,k} = ∇L_t
    if lam is not None and (share or ghat is not None):
        if share:
            total = {name: g.sum(0) for name, g in grads.items()}  # Σ_t ∇L_t
            norm = torch.sqrt(sum(g.square().sum() for g in total.values()))  # over the whole parameter vector
            ghat_k = {name: g / norm for name, g in total.items()}  # Eq. 1: g_k; Eq. 2: ĝ_k = g_k on the first iteration
            if ghat is not None:
                momentum = torch.sigmoid(m[k])
                ghat_k = {name: momentum * g + (1 - momentum) * ghat[k][name] for name, g in ghat_k.items()}  # Eq. 3
        gate = torch.sigmoid(lam[k])
        shared = ghat_k if share else ghat[k]  # Algorithm 2 uses the stored running mean, unchanged
        delta = {name: gate * shared[name] + (1 - gate) * g for name, g in grads.items()}  # Eq. 4, ĝ broadcast over tasks
    return {name: w - alpha[name] * delta[name] for name, w in fast.items()}, ghat_k  # α ⊙ Δ, α broadcast over tasks


def inner_loop(theta: dict[str, torch.Tensor], alpha: dict[str, torch.Tensor | float], m: torch.Tensor | None,
               lam: torch.Tensor | None, ghat: list[dict[str, torch.Tensor]] | None, x_s: torch.Tensor,
               y_s: torch.Tensor, *, inner_steps: int, share: bool, create_graph: bool, use_vmap: bool,
               recompute: bool = False):
    """Adapt θ to every task of the batch: K inner steps (Algorithm 1 with share=True, Algorithm 2 without).

    theta: the initialisation, one tensor per Conv4 parameter; alpha: their learning rates, each shaped
    like its θ tensor (or one float when α is fixed); x_s (tasks, ways*shots, C, H, W), y_s (tasks,
    ways*shots). m, lam: (K,) or None for plain Meta-SGD. ghat: the stored ĝ (K dicts like theta) or
    None before the first meta-iteration. Returns the adapted weights, each (tasks, ...),
    and with share=True the new ĝ (K dicts, still attached to the graph: m gets its gradient there).
    recompute: gradient checkpointing. Each task's ∇L_t at steps 1..K-1 (its support forward and backward,
    the activations) is not kept but recomputed in the backward pass, one task at a time on the loop path;
    what couples the tasks (g_k, ĝ_k, Δ: parameter-sized) and step K stay stored. The same gradients, with
    the activations of step K and one task's step, for one more support forward-backward per earlier step.
    """
    tasks = x_s.shape[0]
    fast = {name: p.expand(tasks, *p.shape) for name, p in theta.items()}  # θ_{t,0} = θ, (tasks, ...)
    step = partial(inner_step, alpha=alpha, m=m, lam=lam, ghat=ghat, x_s=x_s, y_s=y_s, share=share,
                   create_graph=create_graph, use_vmap=use_vmap)
    new_ghat = []
    for k in range(inner_steps):
        # The last step is the first the backward needs: it stays stored (as in checkpoint_sequential).
        fast, ghat_k = step(fast, k, recompute=recompute and k < inner_steps - 1)
        new_ghat.append(ghat_k)
    return fast, (new_ghat if share and lam is not None else None)


def split_params(params: dict[str, torch.Tensor], inner_lr: float):
    """params -> (θ, α, m, λ); α is inner_lr for every tensor when not learned; m, λ are None without sharing."""
    theta = {name: p for name, p in params.items() if name not in GS_PARAMS and not name.startswith(ALPHA)}
    alpha = {name: params.get(ALPHA + name, inner_lr) for name in theta}
    return theta, alpha, params.get("m"), params.get("lambda")


def meta_gradient(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, epoch: int, *,
                  inner_steps: int, inner_lr: float, first_order: bool, use_vmap: bool,
                  recompute: bool = False) -> common.StepResult:
    """One meta-iteration of Algorithm 1: adapt every task, query loss (Eq. 5), its gradient w.r.t. θ, α, m, λ."""
    theta, alpha, m, lam = split_params(params, inner_lr)
    num_tasks = tasks.x_s.shape[0]
    # With sharing, g_k couples the tasks: they adapt and are differentiated together. Without, they are
    # independent, and on the loop path one task at a time gives the same sum with 1/T of the memory.
    groups = [slice(None)] if lam is not None or use_vmap else [slice(t, t + 1) for t in range(num_tasks)]
    loss, correct, grads = 0.0, 0.0, [None] * len(params)
    for group in groups:
        fast, ghat = inner_loop(theta, alpha, m, lam, state["ghat"], tasks.x_s[group], tasks.y_s[group],
                                inner_steps=inner_steps, share=True, create_graph=not first_order, use_vmap=use_vmap,
                                recompute=recompute)
        # (1/T) Σ_t L_t^query (Eq. 5) and its gradient w.r.t. θ_{t,K}, one task at a time (memory), then one
        # backward through the inner loop to every meta-parameter (m gets none on the first iteration).
        group_loss, group_acc, d_fast = common.query_loss_grads(fast, tasks.x_q[group], tasks.y_q[group],
                                                                1 / num_tasks, use_vmap)
        group_grads = torch.autograd.grad(list(fast.values()), list(params.values()), list(d_fast.values()),
                                          allow_unused=True)
        grads = [total if g is None else g if total is None else total + g for total, g in zip(grads, group_grads)]
        loss, correct = loss + group_loss, correct + group_acc.sum()
    if ghat is not None:
        state = {"ghat": [{name: g.detach() for name, g in ghat_k.items()} for ghat_k in ghat]}
    return common.StepResult(loss, correct / num_tasks, dict(zip(params, grads)), state)


def predict(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, *,
            inner_steps: int, inner_lr: float, use_vmap: bool) -> torch.Tensor:
    """Algorithm 2: adapt with the stored ĝ (never updated), return query logits (tasks, ways*queries, ways)."""
    theta, alpha, m, lam = split_params({name: p.detach().requires_grad_() for name, p in params.items()}, inner_lr)
    with torch.enable_grad():
        fast, _ = inner_loop(theta, alpha, m, lam, state["ghat"], tasks.x_s, tasks.y_s, inner_steps=inner_steps,
                             share=False, create_graph=False, use_vmap=use_vmap)
    with torch.no_grad():
        return common.forward_tasks(common.conv4_forward, fast, tasks.x_q, use_vmap)


def scalars(params: dict[str, torch.Tensor], state: dict) -> dict[str, float]:
    """Mean σ(m_k) and σ(λ_k) over k (the paper's Figures 3, 5, 7, 9, 11); mean and spread of all elements of α."""
    values = {}
    if "m" in params:
        values.update(sigma_m=torch.sigmoid(params["m"]).mean().item(),
                      sigma_lambda=torch.sigmoid(params["lambda"]).mean().item())
    alpha = [p.detach().flatten() for name, p in params.items() if name.startswith(ALPHA)]
    if alpha:
        alpha = torch.cat(alpha)  # every learning rate of the network, (number of θ elements,)
        values.update(alpha_mean=alpha.mean().item(), alpha_std=alpha.std().item())
    return values


def make_algorithm(args: Args, image_shape: tuple[int, int, int], device: torch.device) -> common.Algorithm:
    """θ from the seed; α = --inner-lr everywhere; m = λ = 0 (σ = 0.5) with gradient sharing; no ĝ yet."""
    theta = common.conv4_init(image_shape, args.ways, args.filters, generator=torch.Generator().manual_seed(args.seed))
    params = dict(theta)
    if args.learn_alpha:
        params.update({ALPHA + name: torch.full_like(p, args.inner_lr) for name, p in theta.items()})
    if args.gs:
        params.update({name: torch.zeros(args.inner_steps) for name in GS_PARAMS})
    params = {name: p.to(device).requires_grad_() for name, p in params.items()}
    vmap = common.use_vmap(args.vmap, device)
    inner = dict(inner_steps=args.inner_steps, inner_lr=args.inner_lr, use_vmap=vmap)
    return common.Algorithm(
        name="metasgd_gs" if args.gs else "metasgd", params=params, state={"ghat": None},
        meta_gradient=partial(meta_gradient, first_order=args.first_order, recompute=args.recompute, **inner),
        predict=partial(predict, **inner), scalars=scalars)


if __name__ == "__main__":
    common.main(Args, make_algorithm, description=__doc__.splitlines()[0])

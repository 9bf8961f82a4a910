"""MAML, with and without gradient sharing.

Paper: O. Chang and H. Lipson, "Accelerating Meta-Learning by Sharing Gradients", arXiv 2312.08398:
Algorithm 1 (meta-training) and Algorithm 2 (meta-testing). With --no-gs this file is plain
second-order MAML (C. Finn, P. Abbeel and S. Levine, arXiv 1703.03400).

Gradient sharing at inner step k = 1..K, for the T tasks of a batch (names in `inner_step`):
    g_k     = Σ_t ∇L_t(θ_{t,k-1}) / ‖Σ_t ∇L_t(θ_{t,k-1})‖₂          (Eq. 1)  `total`, `norm`: one global L2 norm
    ĝ_k     = g_k                        on the first meta-iteration (Eq. 2)  `ghat` is None before it
    ĝ_k     = σ(m_k) g_k + (1 − σ(m_k)) ĝ_k^old           afterwards (Eq. 3)  `ghat_k`; ĝ^old stored, detached
    Δ_{t,k} = σ(λ_k) ĝ_k + (1 − σ(λ_k)) ∇L_t(θ_{t,k-1})               (Eq. 4)  `delta`
    θ_{t,k} = θ_{t,k-1} − α Δ_{t,k}                                           `fast`, α = --inner-lr
Outer step: Adam on (θ, m, λ) with the loss (1/T) Σ_t L_t^query(θ_{t,K})   (Eq. 5)  `meta_gradient`
Meta-validation and meta-test (Algorithm 2) use the stored ĝ_k and never change it  `predict`

Decisions where the paper is silent: m, λ ∈ R^K start at 0 (σ = 0.5); second order by default, so the
meta-gradient flows through g_k, its norm and the task gradients; m gets no gradient on the first
meta-iteration (ĝ = g there); before any ĝ is stored, evaluation uses the plain gradient. BatchNorm's scale
and shift are meta-learned by the outer loop but not adapted in the inner loop (so g_k, ĝ_k leave them out),
as in MAML's own code (BatchNorm variables outside the adapted weights); --adapt-bn adapts them too.
The network: Conv4, or fmu2/PyTorch-MAML's ResNet-12 with --backbone resnet12 (common.resnet12_forward).

How it runs: `common.main` parses `Args`; `common.run` builds the meta-parameters with `make_algorithm`, steps
Adam with the gradients of `meta_gradient` on every batch of tasks (carrying its `state`, the stored ĝ, and
averaging its `metrics` per epoch), and evaluates `predict` on fixed validation tasks after every epoch and on
the test tasks at the end (the ensemble of the 5 best checkpoints).

Reproduces arXiv 2312.08398, Table 1 (5-way 5-shot), rows MAML/5 and MAML/1 (task batch 5 and 1),
columns ORIGINAL (--no-gs) and GRADSHARE (--gs); CUB: 150 epochs (task batch 5) or 750 (task batch 1),
MiniImagenet: 250 or 1250. E.g.
    python maml_gs.py --dataset cub --shots 5 --tasks 5 --epochs 150 --no-gs
    python maml_gs.py --dataset cub --shots 5 --tasks 5 --epochs 150 --gs
`make reproduce-table1` runs every row.
"""
from __future__ import annotations

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
    """inner-loop learning rate α"""
    first_order: bool = False
    """first-order approximation: no gradient through the inner-loop gradients"""
    recompute: bool = False
    """gradient checkpointing: recompute the query pass and each inner step but the last in the backward pass"""

    def check(self) -> list[str]:
        problems = super().check()
        if self.inner_steps < 1:
            problems.append(f"--inner-steps must be a positive integer, got {self.inner_steps}")
        if not self.inner_lr > 0:
            problems.append(f"--inner-lr must be positive, got {self.inner_lr}")
        return problems


GS_PARAMS = ("m", "lambda")  # meta-learned momentum and gate, one per inner step (K,)


def init_params(args: Args, image_shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """θ (Conv4) from the seed; with gradient sharing m = λ = 0 (σ = 0.5)."""
    params = common.init_backbone(args, image_shape)
    if args.gs:
        params.update({name: torch.zeros(args.inner_steps) for name in GS_PARAMS})
    return params


def split_params(params: dict[str, torch.Tensor]):
    """params -> (θ, m, λ); m and λ are None for plain MAML."""
    theta = {name: p for name, p in params.items() if name not in GS_PARAMS}
    return theta, params.get("m"), params.get("lambda")


def inner_step(fast: dict[str, torch.Tensor], k: int, m: torch.Tensor | None, lam: torch.Tensor | None,
               ghat: list[dict[str, torch.Tensor]] | None, x_s: torch.Tensor, y_s: torch.Tensor, args: Args,
               share: bool, create_graph: bool, frozen: dict[str, torch.Tensor]):
    """Inner step k+1 for every task of the batch, Eq. 1-4 (k counts from 0 here and indexes m, λ, ĝ).

    Returns θ_{t,k+1} for every task, (tasks, ...) per adapted tensor, and ĝ_{k+1} (None unless shared).
    """
    grads = common.support_grads(common.FORWARD[args.backbone], fast, x_s, y_s, create_graph=create_graph,
                                 use_vmap=args.vmap == "on", frozen=frozen)  # ∇L_t(θ_{t,k}), (tasks, ...)
    delta, ghat_k = grads, None  # without sharing: Δ_{t,k} = ∇L_t
    if lam is not None and (share or ghat is not None):
        if share:
            total = {name: g.sum(0) for name, g in grads.items()}  # Σ_t ∇L_t
            norm = torch.sqrt(sum(g.square().sum() for g in total.values()))  # over the whole parameter vector
            ghat_k = {name: g / norm for name, g in total.items()}  # Eq. 1: g_k; Eq. 2: ĝ_k = g_k at first
            if ghat is not None:
                momentum = torch.sigmoid(m[k])
                ghat_k = {name: momentum * g + (1 - momentum) * ghat[k][name] for name, g in ghat_k.items()}  # Eq. 3
        gate = torch.sigmoid(lam[k])
        shared = ghat_k if share else ghat[k]  # Algorithm 2 uses the stored running mean, unchanged
        delta = {name: gate * shared[name] + (1 - gate) * g for name, g in grads.items()}  # Eq. 4, ĝ broadcast
    return {name: w - args.inner_lr * delta[name] for name, w in fast.items()}, ghat_k


def inner_loop(theta: dict[str, torch.Tensor], m: torch.Tensor | None, lam: torch.Tensor | None,
               ghat: list[dict[str, torch.Tensor]] | None, x_s: torch.Tensor, y_s: torch.Tensor, args: Args,
               share: bool, create_graph: bool):
    """Adapt θ to every task of the batch: K inner steps (Algorithm 1 with share=True, Algorithm 2 without).

    x_s (tasks, ways*shots, C, H, W), y_s (tasks, ways*shots); m, lam (K,) or None without sharing; ghat the
    stored ĝ (K dicts like θ) or None before the first meta-iteration. Returns the adapted weights, each
    (tasks, ...), and with share=True the new ĝ (still attached to the graph: m gets its gradient there).
    Only the tensors common.split_adapted names are adapted (and span g_k, ĝ_k): BatchNorm's unless --adapt-bn.
    --recompute: torch.utils.checkpoint keeps only the inputs of steps 1..K-1 and recomputes each step in
    the backward pass; step K, the first the backward needs, stays stored (the query pass: forward_tasks).
    """
    weights = {name: p.expand(x_s.shape[0], *p.shape) for name, p in theta.items()}  # θ_{t,0} = θ, (tasks, ...)
    fast, frozen = common.split_adapted(weights, args.adapt_bn)
    new_ghat = []
    for k in range(args.inner_steps):
        step_args = (fast, k, m, lam, ghat, x_s, y_s, args, share, create_graph, frozen)
        if args.recompute and k < args.inner_steps - 1:
            fast, ghat_k = torch.utils.checkpoint.checkpoint(inner_step, *step_args, use_reentrant=False)
        else:
            fast, ghat_k = inner_step(*step_args)
        new_ghat.append(ghat_k)
    return {**fast, **frozen}, (new_ghat if share and lam is not None else None)


def meta_gradient(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, epoch: int,
                  args: Args) -> common.StepResult:
    """One meta-iteration of Algorithm 1: adapt every task; the query loss (Eq. 5) and its meta-gradient."""
    theta, m, lam = split_params(params)
    fast, ghat = inner_loop(theta, m, lam, state["ghat"], tasks.x_s, tasks.y_s, args, share=True,
                            create_graph=not args.first_order)
    # (1/T) Σ_t L_t^query(θ_{t,K}) and its gradient w.r.t. every meta-parameter, through the inner loop
    logits = common.forward_tasks(common.FORWARD[args.backbone], fast, tasks.x_q, args.vmap == "on",
                                  args.recompute)  # (tasks, ways*queries, ways)
    loss, acc = common.query_loss(logits, tasks.y_q)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)  # m: None on the first iteration
    metrics = {}
    if ghat is not None:
        state = {"ghat": [{name: g.detach() for name, g in ghat_k.items()} for ghat_k in ghat]}
        # The paper's Figures 3, 5, 7, 9, 11: σ(m_k), σ(λ_k), mean over k.
        metrics.update(sigma_m=torch.sigmoid(m).mean().item(), sigma_lambda=torch.sigmoid(lam).mean().item())
    return common.StepResult(loss.detach(), acc, dict(zip(params, grads)), state, metrics)


def predict(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, args: Args) -> torch.Tensor:
    """Algorithm 2: adapt with the stored ĝ (never updated), return query logits (tasks, ways*queries, ways)."""
    detached = {name: p.detach().requires_grad_() for name, p in params.items()}
    theta, m, lam = split_params(detached)
    with torch.enable_grad():
        fast, _ = inner_loop(theta, m, lam, state["ghat"], tasks.x_s, tasks.y_s, args, share=False,
                             create_graph=False)
    with torch.no_grad():
        return common.forward_tasks(common.FORWARD[args.backbone], fast, tasks.x_q, args.vmap == "on")


def make_algorithm(args: Args, image_shape: tuple[int, int, int], device: torch.device) -> common.Algorithm:
    """The meta-parameters on `device`; no ĝ before the first meta-iteration."""
    params = {name: p.to(device).requires_grad_() for name, p in init_params(args, image_shape).items()}
    return common.Algorithm("maml_gs" if args.gs else "maml", params, {"ghat": None}, meta_gradient, predict)


if __name__ == "__main__":
    common.main(Args, make_algorithm, description=__doc__.splitlines()[0])

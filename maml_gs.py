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
--gs-source (default both, the paper, as above) takes the two sources of the shared direction apart:
    batch:   ĝ_k = g_k at every meta-iteration (no running mean, no m_k): `both` with σ(m_k) = 1; the stored ĝ_k
             that Algorithm 2 uses is the last training batch's g_k
    history: Δ_{t,k} = σ(λ_k) ĝ_k^old + (1 − σ(λ_k)) ∇L_t: the earlier batches' mean only (on the first
             meta-iteration, with none yet, no sharing, and λ gets no gradient); g_k only updates it for the next one:
             ĝ_k = ½ g_k + ½ ĝ_k^old, a fixed momentum (`HISTORY_MOMENTUM`, m_k's start), since no gradient can reach
             m_k (the mean is stored detached); Algorithm 2 uses that mean, the last training batch included
    In `inner_step`: `stored` = ĝ^old, `shared` = the direction Eq. 4 mixes in, `Sharing.source` = the mode.
Names in every function: `theta` = θ's tensors the inner loop adapts, `frozen` = the others (read, never adapted).

Decisions where the paper is silent: m, λ ∈ R^K start at 0 (σ = 0.5); second order by default, so the
meta-gradient flows through g_k, its norm and the task gradients; m gets no gradient on the first
meta-iteration (ĝ = g there); before any ĝ is stored, evaluation uses the plain gradient. BatchNorm's scale
and shift are meta-learned by the outer loop but not adapted in the inner loop (so g_k, ĝ_k leave them out),
as in MAML's own code (BatchNorm variables outside the adapted weights); --adapt-bn adapts them too.
The network: Conv4, or fmu2/PyTorch-MAML's ResNet-12 with --backbone resnet12 (common.resnet12_forward).
Regression: --dataset sinusoid (Finn et al.'s Section 5.1 task family) runs the 1-40-40-1 MLP (--backbone mlp)
with the squared error as L_t; g_k, ĝ_k then span the MLP's weights, and validation ranks by the lowest MSE.

How it runs: `main`, at the end of this file, shows meta-training in order: the outer Adam on θ (and m, λ),
the epochs of meta-iterations (`meta_gradient` on a fresh task batch, then the Adam step, the new ĝ kept),
meta-validation with `predict` after every epoch, and the meta-test of the 5 best checkpoints' ensemble.
common.py holds the plumbing only: data, the network, the run directory, checkpoints, signals and logs.
Several processes (torchrun, srun; one per GPU): each adapts its equal share of the same batch (`main`); the
batch's Σ_t ∇L_t of Eq. 1 is an all-reduce inside `inner_step` that the meta-gradient flows through, and the
meta-gradient the mean over processes (`meta_gradient`): N processes compute the one-process meta-gradient.

Reproduces arXiv 2312.08398, Table 1 (5-way 5-shot), rows MAML/5 and MAML/1 (task batch 5 and 1),
columns ORIGINAL (--no-gs) and GRADSHARE (--gs); CUB: 150 epochs (task batch 5) or 750 (task batch 1),
MiniImagenet: 250 or 1250. E.g.
    python maml_gs.py --dataset cub --shots 5 --tasks 5 --epochs 150 --no-gs
    python maml_gs.py --dataset cub --shots 5 --tasks 5 --epochs 150 --gs
`make reproduce-table1` runs every row; `make reproduce-sinusoid` the sinusoid rows (MAML, MAML + GS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.utils.checkpoint

import common


@dataclass
class Args(common.Args):
    gs: bool = True
    """gradient sharing (--gs), or none (--no-gs)"""
    gs_source: Literal["both", "batch", "history"] = "both"
    """what --gs shares: both (the paper: this batch's g_k and the earlier batches' ĝ_k), batch (g_k), or history"""
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
        if not self.gs and self.gs_source != "both":
            problems.append(f"--gs-source {self.gs_source} applies to --gs only")
        return problems


GS_PARAMS = ("m", "lambda")  # meta-learned momentum and gate, one per inner step (K,); m: --gs-source both only
HISTORY_MOMENTUM = 0.5  # --gs-source history: σ(0) = ½, the σ(m_k) m_k starts at; no gradient reaches m_k there


class Sharing(NamedTuple):
    """Gradient sharing's inputs to one inner loop (None in its place: no sharing)."""
    m: torch.Tensor | None  # (K,) σ(m_k) weighs this batch's g_k against the stored ĝ_k (Eq. 3); both only
    lam: torch.Tensor  # (K,) σ(λ_k) weighs ĝ_k against each task's own gradient (Eq. 4)
    ghat: list[dict[str, torch.Tensor]] | None  # the stored ĝ_1..ĝ_K (detached, like θ); None before the first
    update: bool  # Algorithm 1: ĝ_k from this batch's g_k (Eq. 1-3); Algorithm 2 (False): the stored ĝ_k as it is
    source: str = "both"  # --gs-source: what the inner steps of Algorithm 1 share


def init_params(args: Args, image_shape: tuple[int, int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """The meta-parameters, leaves on `device`: θ (--backbone) from the seed; with sharing m = λ = 0 (σ = 0.5)."""
    params = common.init_backbone(args, image_shape)
    if args.gs:
        params.update({name: torch.zeros(args.inner_steps) for name in GS_PARAMS
                       if name == "lambda" or args.gs_source == "both"})
    return {name: p.to(device).requires_grad_() for name, p in params.items()}


def init_state(args: Args) -> dict:
    """What one meta-iteration hands the next (`state`): the stored ĝ_1..ĝ_K, none before the first."""
    return {"ghat": None}


def split_params(params: dict[str, torch.Tensor], args: Args):
    """params -> (θ's adapted tensors, θ's frozen ones (BatchNorm's unless --adapt-bn), m, λ); m, λ None: --no-gs."""
    net = {n: p for n, p in params.items() if n not in GS_PARAMS}
    theta, frozen = common.split_adapted(net, args.adapt_bn)
    return theta, frozen, params.get("m"), params.get("lambda")


def inner_step(k: int, fast: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], tasks: common.Tasks,
               sharing: Sharing | None, args: Args, create_graph: bool):
    """Inner step k+1 for every task of the batch, Eq. 1-4 (k counts from 0 here and indexes m, λ, ĝ).

    fast: θ_{t,k}, frozen: θ's tensors not adapted, (tasks, ...) each. Returns θ_{t,k+1} and ĝ_{k+1} (None unless
    sharing.update).
    """
    grads = common.support_grads(common.FORWARD[args.backbone], fast, tasks.x_s, tasks.y_s, create_graph=create_graph,
                                 use_vmap=args.vmap == "on", frozen=frozen)  # ∇L_t(θ_{t,k}), (tasks, ...)
    delta, ghat_k = grads, None  # without sharing: Δ_{t,k} = ∇L_t
    stored = sharing.ghat if sharing is not None else None  # ĝ^old_1..K of the earlier meta-iterations, or None
    if sharing is not None and sharing.update:
        # Σ_t ∇L_t; history: g_k only feeds the stored mean, which is detached: no graph to keep
        mine = [(g.detach() if sharing.source == "history" else g).sum(0) for g in grads.values()]  # my tasks'
        total = dict(zip(grads, common.sum_over_processes(mine)))  # the batch's (several processes: an all-reduce)
        norm = torch.sqrt(sum(g.square().sum() for g in total.values()))  # over the whole parameter vector
        ghat_k = {name: g / norm for name, g in total.items()}  # Eq. 1: g_k; Eq. 2: ĝ_k = g_k at first
        if stored is not None and sharing.source != "batch":  # Eq. 3 (batch: ĝ_k = g_k, σ(m_k) = 1 as it were)
            momentum = torch.sigmoid(sharing.m[k]) if sharing.source == "both" else HISTORY_MOMENTUM
            ghat_k = {name: momentum * g + (1 - momentum) * stored[k][name] for name, g in ghat_k.items()}
    # What this step shares: the new ĝ_k in training (history: the stored one only, which the new ĝ_k replaces
    # for the next meta-iteration), the stored one in evaluation (Algorithm 2); none before any is stored.
    shared = ghat_k if sharing is not None and sharing.update and sharing.source != "history" else (
        stored[k] if stored is not None else None)
    if shared is not None:
        gate = torch.sigmoid(sharing.lam[k])
        delta = {name: gate * shared[name] + (1 - gate) * g for name, g in grads.items()}  # Eq. 4, ĝ broadcast
    return {name: w - args.inner_lr * delta[name] for name, w in fast.items()}, ghat_k


def inner_loop(theta: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], tasks: common.Tasks,
               sharing: Sharing | None, args: Args, create_graph: bool):
    """Adapt θ to every task of the batch: K inner steps on its support set (Algorithm 1 or 2, as sharing.update).

    The tensors as split_params splits them; tasks.x_s (tasks, ways*shots, C, H, W), tasks.y_s (tasks, ways*shots).
    Returns θ_{t,K}, (tasks, ...) per tensor of θ (the frozen ones as θ's), and with sharing.update the new ĝ
    (still attached to the graph: m gets its gradient there), else None. BatchNorm's tensors are frozen unless
    --adapt-bn (and then span g_k, ĝ_k too). --recompute: torch.utils.checkpoint keeps only the inputs of steps
    1..K-1 and recomputes each step in the backward pass; step K, the first the backward needs, stays stored.
    """
    count = tasks.x_s.shape[0]
    fast = {name: p.expand(count, *p.shape) for name, p in theta.items()}  # θ_{t,0} = θ, (tasks, ...)
    frozen = {name: p.expand(count, *p.shape) for name, p in frozen.items()}
    new_ghat = []
    for k in range(args.inner_steps):
        step_args = (k, fast, frozen, tasks, sharing, args, create_graph)
        if args.recompute and k < args.inner_steps - 1:
            fast, ghat_k = torch.utils.checkpoint.checkpoint(inner_step, *step_args, use_reentrant=False)
        else:
            fast, ghat_k = inner_step(*step_args)
        new_ghat.append(ghat_k)
    return {**fast, **frozen}, (new_ghat if sharing is not None and sharing.update else None)


def meta_gradient(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, epoch: int,
                  args: Args) -> common.StepResult:
    """One meta-iteration of Algorithm 1: adapt every task; the query loss (Eq. 5) and its meta-gradient."""
    theta, frozen, m, lam = split_params(params, args)
    sharing = Sharing(m, lam, state["ghat"], update=True, source=args.gs_source) if lam is not None else None
    fast, ghat = inner_loop(theta, frozen, tasks, sharing, args, create_graph=not args.first_order)
    # (1/T) Σ_t L_t^query(θ_{t,K}) and its gradient w.r.t. every meta-parameter, through the inner loop
    logits = common.forward_tasks(common.FORWARD[args.backbone], fast, tasks.x_q, args.vmap == "on",
                                  args.recompute)  # (tasks, ways*queries, ways)
    loss, acc = common.query_loss(logits, tasks.y_q)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)  # m: None on the first iteration
    grads = common.mean_over_processes(dict(zip(params, grads)))  # several processes: the mean of their equal shares
    metrics = {}
    if ghat is not None:
        state = {"ghat": [{name: g.detach() for name, g in ghat_k.items()} for ghat_k in ghat]}
        # The paper's Figures 3, 5, 7, 9, 11: σ(m_k), σ(λ_k), mean over k (tensors: read once per epoch)
        if m is not None:
            metrics["sigma_m"] = torch.sigmoid(m).mean().detach()
        metrics["sigma_lambda"] = torch.sigmoid(lam).mean().detach()
    return common.StepResult(loss.detach(), acc, grads, state, metrics)


def predict(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, args: Args) -> torch.Tensor:
    """Algorithm 2: adapt with the stored ĝ (never updated), return query logits (tasks, ways*queries, ways)."""
    theta, frozen, m, lam = split_params({name: p.detach().requires_grad_() for name, p in params.items()}, args)
    sharing = Sharing(m, lam, state["ghat"], update=False) if lam is not None else None
    with torch.enable_grad():
        fast, _ = inner_loop(theta, frozen, tasks, sharing, args, create_graph=False)
    with torch.no_grad():
        return common.forward_tasks(common.FORWARD[args.backbone], fast, tasks.x_q, args.vmap == "on")


def main(argv: list[str] | None = None) -> dict:
    """Meta-train (Algorithm 1) with the outer Adam, meta-validate after every epoch, meta-test the top-5 ensemble
    (Algorithm 2). common.Run is the plumbing: run directory, checkpoints, signals, logs. Returns result.json's dict."""
    args = common.parse_args(Args, argv, __doc__.splitlines()[0])  # --resume: the run's own arguments
    name = f"maml_gs{'' if args.gs_source == 'both' else '_' + args.gs_source}" if args.gs else "maml"
    with common.Run(args, name) as run:  # SIGINT/SIGTERM: save at the next step
        args = run.args  # --vmap auto decided for the device
        data = run.load_data()  # training task sampler, fixed validation and test tasks, on the device
        params = init_params(args, data.image_shape, run.device)  # what the outer Adam learns
        state = init_state(args)  # the stored ĝ_1..ĝ_K, carried from one meta-iteration to the next
        adam = torch.optim.Adam(params.values(), lr=args.outer_lr)
        run.restore(params, state, adam, data.sampler)  # the run directory; --resume: all four from last.pt
        for epoch in run.epochs():
            for tasks in run.iterations(data.sampler):  # --iters-per-epoch batches of --tasks tasks, alike in all
                # torchrun/srun: this process adapts its share of the batch; the all-reduces over processes are
                # inner_step's Σ_t ∇L_t (through which the meta-gradient flows) and meta_gradient's mean
                mine = common.my_share(tasks)  # one process: the whole batch
                result = meta_gradient(params, state, mine, epoch, args)
                if run.accept(result):  # finite (else skipped and counted: a diverging run stops)
                    for name, p in params.items():
                        p.grad = result.grads[name]
                    adam.step()
                    state.update(result.state)  # the new ĝ
            run.validate(lambda tasks: predict(params, state, tasks, args), data.val)  # keeps the best checkpoints
        return run.meta_test(lambda params, state, tasks: predict(params, state, tasks, args), data.test)


if __name__ == "__main__":
    main()

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
           and the query forward after it (k = 0..K−1, the reference's num_step); outer loop only  (`frozen_at`)
    MSL    L = Σ_j w_j(epoch) (1/T) Σ_t L_t^query(θ_{t,j}) over j = 1..K while epoch < --msl-epochs,
           then the final step j = K only  (`msl_weights`)
    DA     first order while epoch < --first-order-epochs, second order afterwards  (`meta_gradient`)
    CA     cosine annealing of the outer learning rate from --outer-lr to --min-outer-lr over --epochs  (`cosine_lr`)
    clamp  each meta-gradient element of the network (θ, BN) to ±--clip-grad  (`meta_gradient`)
Outer step: Adam on (θ, BN, LSLR, m, λ) with the loss above (Eq. 5 with MSL)   `meta_gradient`
Meta-validation and meta-test (Algorithm 2) use the stored ĝ_k and never change it  `predict`
--gs-source (default both, the paper, as above) takes the two sources of the shared direction apart:
    batch:   ĝ_k = g_k at every meta-iteration (no running mean, no m_k): `both` with σ(m_k) = 1; the stored ĝ_k
             that Algorithm 2 uses is the last training batch's g_k
    history: Δ_{t,k} = σ(λ_k) ĝ_k^old + (1 − σ(λ_k)) ∇L_t: the earlier batches' mean only (on the first
             meta-iteration, with none yet, no sharing, and λ gets no gradient); g_k only updates it for the next one:
             ĝ_k = ½ g_k + ½ ĝ_k^old, a fixed momentum (`HISTORY_MOMENTUM`, m_k's start), since no gradient can reach
             m_k (the mean is stored detached); Algorithm 2 uses that mean, the last training batch included
    In `inner_step`: `stored` = ĝ^old, `shared` = the direction Eq. 4 mixes in, `Sharing.source` = the mode.
Names: `theta` = θ's tensors the inner loop adapts, `frozen` = the others (BN tensors; row k of each: `frozen_k`).

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

How it runs: `main`, at the end of this file, shows meta-training in order: the outer Adam on all the
meta-parameters with each epoch's cosine learning rate, the epochs of meta-iterations (`meta_gradient` on a
fresh task batch with that epoch's MSL weights and derivative order, then the Adam step, the new ĝ kept),
meta-validation with `predict` after every epoch, and the meta-test of the 5 best checkpoints' ensemble.
common.py holds the plumbing only: data, the network, the run directory, checkpoints, signals and logs.
Several processes (torchrun, srun; one per GPU): each adapts its equal share of the same batch (`main`); the
batch's Σ_t ∇L_t of Eq. 1 is an all-reduce inside `inner_step` that the meta-gradient flows through, and the
meta-gradient the mean over processes (`meta_gradient`, before the clipping): N processes compute the one-process
meta-gradient.
Conv4 only (--backbone): per-step BN rows are Conv4's, as MAML++'s.

Reproduces arXiv 2312.08398, Table 1 (5-way 5-shot), rows MAML++/5 and MAML++/1 (task batch 5 and 1),
columns ORIGINAL (--no-gs) and GRADSHARE (--gs); CUB: 150 epochs (task batch 5) or 750 (task batch 1),
MiniImagenet: 250 or 1250, with --clip-grad 10; --min-outer-lr 0.001 (above). E.g. (and with --no-gs)
    python mamlpp_gs.py --dataset miniimagenet --shots 5 --tasks 5 --epochs 250 --clip-grad 10 --min-outer-lr 0.001 --gs
`make reproduce-table1` runs every row.
"""
from __future__ import annotations

import math
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
    images_only = ("MAML++'s per-step BatchNorm is part of its Conv4 (the sinusoid's MLP has none), and its paper and "
                   "reference code run images only; run the sinusoid with maml_gs.py or metasgd_gs.py")

    def check(self) -> list[str]:
        problems = super().check()
        if self.inner_steps < 1:
            problems.append(f"--inner-steps must be a positive integer, got {self.inner_steps}")
        if not self.inner_lr > 0:
            problems.append(f"--inner-lr must be positive, got {self.inner_lr}")
        if not self.gs and self.gs_source != "both":
            problems.append(f"--gs-source {self.gs_source} applies to --gs only")
        for name in ("msl_epochs", "first_order_epochs", "clip_grad"):
            if not getattr(self, name) >= 0:
                problems.append(f"--{name.replace('_', '-')} must be 0 (off) or positive, got {getattr(self, name)}")
        if self.adapt_bn and self.per_step_bn:
            problems.append("--adapt-bn needs --no-per-step-bn: per-step BN rows are learned by the outer loop only")
        if self.cosine and not 0 <= self.min_outer_lr <= self.outer_lr:
            problems.append(f"--min-outer-lr must lie in [0, --outer-lr = {self.outer_lr}], got {self.min_outer_lr}")
        return problems


GS_PARAMS = ("m", "lambda")  # meta-learned momentum and gate, one per inner step (K,); m: --gs-source both only
HISTORY_MOMENTUM = 0.5  # --gs-source history: σ(0) = ½, the σ(m_k) m_k starts at; no gradient reaches m_k there
LSLR = "lslr."  # lslr.<name>: the learned inner learning rates of adapted tensor <name>, one per step (K,)
BN = common.BN  # Conv4's BatchNorm tensors bn{i}.weight and bn{i}.bias; per-step: (K, C), else (C,)
MSL_FLOOR = 0.03  # MSL: each non-final weight falls to at least MSL_FLOOR / K (the reference's value)


class Sharing(NamedTuple):
    """Gradient sharing's inputs to one inner loop (None in its place: no sharing)."""
    m: torch.Tensor | None  # (K,) σ(m_k) weighs this batch's g_k against the stored ĝ_k (Eq. 3); both only
    lam: torch.Tensor  # (K,) σ(λ_k) weighs ĝ_k against each task's own gradient (Eq. 4)
    ghat: list[dict[str, torch.Tensor]] | None  # the stored ĝ_1..ĝ_K (detached, like θ); None before the first
    update: bool  # Algorithm 1: ĝ_k from this batch's g_k (Eq. 1-3); Algorithm 2 (False): the stored ĝ_k as it is
    source: str = "both"  # --gs-source: what the inner steps of Algorithm 1 share


def init_params(args: Args, image_shape: tuple[int, int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """The meta-parameters, leaves on `device`: θ (Conv4) from the seed; BN rows as its BN; LSLR rates --inner-lr;
    with sharing m = λ = 0 (σ = 0.5)."""
    params = common.conv4_init(image_shape, args.ways, args.filters, generator=torch.Generator().manual_seed(args.seed))
    if args.per_step_bn:  # K copies of conv4_init's BN scale 1 and shift 0, in place of the (C,) tensors
        params.update({name: p.expand(args.inner_steps, *p.shape).clone() for name, p in params.items()
                       if name.startswith(BN)})
    if args.lslr:
        adapted, _ = common.split_adapted(params, args.adapt_bn and not args.per_step_bn)
        params.update({LSLR + name: torch.full((args.inner_steps,), args.inner_lr) for name in adapted})
    if args.gs:
        params.update({name: torch.zeros(args.inner_steps) for name in GS_PARAMS
                       if name == "lambda" or args.gs_source == "both"})
    return {name: p.to(device).requires_grad_() for name, p in params.items()}


def init_state(args: Args) -> dict:
    """What one meta-iteration hands the next (`state`): the stored ĝ_1..ĝ_K, none before the first."""
    return {"ghat": None}


def split_params(params: dict[str, torch.Tensor], args: Args):
    """params -> (θ's adapted tensors, θ's frozen ones (BN), LSLR rates, m, λ); fixed rates: [inner_lr] * K; m, λ
    None: --no-gs."""
    net = {name: p for name, p in params.items() if name not in GS_PARAMS and not name.startswith(LSLR)}
    theta, frozen = common.split_adapted(net, args.adapt_bn and not args.per_step_bn)  # per-step BN: never adapted
    lslr = {name: params.get(LSLR + name, [args.inner_lr] * args.inner_steps) for name in theta}
    return theta, frozen, lslr, params.get("m"), params.get("lambda")


def frozen_at(frozen: dict[str, torch.Tensor], k: int, args: Args) -> dict[str, torch.Tensor]:
    """The frozen tensors of inner step k (from 0) and of the query forward after it, (tasks, C) each: row k of
    each per-step BN tensor, or the frozen tensors as they are."""
    return {name: w[:, k] if args.per_step_bn else w for name, w in frozen.items()}


def inner_step(k: int, fast: dict[str, torch.Tensor], frozen_k: dict[str, torch.Tensor], lslr: dict,
               tasks: common.Tasks, sharing: Sharing | None, args: Args, create_graph: bool):
    """Inner step k+1 for every task of the batch, Eq. 1-4 (k counts from 0 here and indexes m, λ, ĝ, LSLR, BN).

    fast: θ_{t,k}, frozen_k: frozen_at(frozen, k), (tasks, ...) each. Returns θ_{t,k+1} and ĝ_{k+1} (None unless
    sharing.update).
    """
    grads = common.support_grads(common.conv4_forward, fast, tasks.x_s, tasks.y_s, create_graph=create_graph,
                                 use_vmap=args.vmap == "on", frozen=frozen_k)  # ∇L_t(θ_{t,k}) with BN row k
    delta, ghat_k = grads, None  # without sharing: Δ_{t,k} = ∇L_t
    stored = sharing.ghat if sharing is not None else None  # ĝ^old_1..K of the earlier meta-iterations, or None
    if sharing is not None and sharing.update:
        # Σ_t ∇L_t; history: g_k only feeds the stored mean, which is detached: no graph to keep
        mine = [(g.detach() if sharing.source == "history" else g).sum(0) for g in grads.values()]  # my tasks'
        total = dict(zip(grads, common.sum_over_processes(mine)))  # the batch's (several processes: an all-reduce)
        norm = torch.sqrt(sum(g.square().sum() for g in total.values()))  # over the whole adapted vector
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
    return {name: w - lslr[name][k] * delta[name] for name, w in fast.items()}, ghat_k  # LSLR: per tensor, step


def inner_loop(theta: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], lslr: dict, tasks: common.Tasks,
               sharing: Sharing | None, args: Args, create_graph: bool):
    """Adapt θ to every task of the batch: K inner steps on its support set (Algorithm 1 or 2, as sharing.update).

    The tensors as split_params splits them: frozen, the BN tensors, (K, C) per-step or (C,) ({} with --adapt-bn);
    lslr, each adapted tensor's rates, (K,) or K floats when fixed; tasks.x_s (tasks, ways*shots, C, H, W),
    tasks.y_s (tasks, ways*shots). Returns the trajectory [θ_{t,0}, ..., θ_{t,K}] (MSL needs every step), each a
    dict of (tasks, ...) tensors, θ_{t,j} (j ≥ 1) with the BN rows of step j's support forward (its query
    forward's too), and with sharing.update the new ĝ (still attached to the graph: m gets its gradient there).
    --recompute: torch.utils.checkpoint keeps only the inputs of steps 1..K-1 and recomputes each step in
    the backward pass; step K, the first the backward needs, stays stored (the query pass: forward_tasks).
    """
    count = tasks.x_s.shape[0]
    fast = {name: p.expand(count, *p.shape) for name, p in theta.items()}  # θ_{t,0} = θ, (tasks, ...)
    frozen = {name: p.expand(count, *p.shape) for name, p in frozen.items()}
    trajectory, new_ghat = [fast], []
    for k in range(args.inner_steps):
        frozen_k = frozen_at(frozen, k, args)
        step_args = (k, fast, frozen_k, lslr, tasks, sharing, args, create_graph)
        if args.recompute and k < args.inner_steps - 1:
            fast, ghat_k = torch.utils.checkpoint.checkpoint(inner_step, *step_args, use_reentrant=False)
        else:
            fast, ghat_k = inner_step(*step_args)
        trajectory.append({**fast, **frozen_k})
        new_ghat.append(ghat_k)
    return trajectory, (new_ghat if sharing is not None and sharing.update else None)


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
    """One meta-iteration of Algorithm 1 with MAML++: adapt every task; the (multi-step) query loss and its gradient.

    By epoch: first order while epoch < --first-order-epochs (DA), the MSL weights of `msl_weights` (MSL)."""
    theta, frozen, lslr, m, lam = split_params(params, args)
    sharing = Sharing(m, lam, state["ghat"], update=True, source=args.gs_source) if lam is not None else None
    trajectory, ghat = inner_loop(theta, frozen, lslr, tasks, sharing, args,
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
    grads = common.mean_over_processes(grads)  # several processes: the mean of their equal shares, clipped below
    if args.clip_grad > 0:  # as the reference: the network's meta-gradients only, not the learning rates, m or λ
        grads = {name: g.clamp(-args.clip_grad, args.clip_grad) if g is not None and (name in theta or name in frozen)
                 else g for name, g in grads.items()}
    metrics = {}  # tensors: read once per epoch
    if args.lslr:
        metrics["lslr_mean"] = torch.stack([p.detach() for p in lslr.values()]).mean()  # (tensors, K)
    if ghat is not None:
        state = {"ghat": [{name: g.detach() for name, g in ghat_k.items()} for ghat_k in ghat]}
        if m is not None:
            metrics["sigma_m"] = torch.sigmoid(m).mean().detach()
        metrics["sigma_lambda"] = torch.sigmoid(lam).mean().detach()
    return common.StepResult(loss.detach(), acc, grads, state, metrics)


def predict(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, args: Args) -> torch.Tensor:
    """Algorithm 2: adapt with the stored ĝ (never updated), return query logits (tasks, ways*queries, ways)."""
    theta, frozen, lslr, m, lam = split_params({n: p.detach().requires_grad_() for n, p in params.items()}, args)
    sharing = Sharing(m, lam, state["ghat"], update=False) if lam is not None else None
    with torch.enable_grad():
        trajectory, _ = inner_loop(theta, frozen, lslr, tasks, sharing, args, create_graph=False)
    with torch.no_grad():
        return common.forward_tasks(common.conv4_forward, trajectory[-1], tasks.x_q, args.vmap == "on")


def main(argv: list[str] | None = None) -> dict:
    """Meta-train (Algorithm 1) with the outer Adam, meta-validate after every epoch, meta-test the top-5 ensemble
    (Algorithm 2). common.Run is the plumbing: run directory, checkpoints, signals, logs. Returns result.json's dict."""
    args = common.parse_args(Args, argv, __doc__.splitlines()[0])  # --resume: the run's own arguments
    name = f"mamlpp_gs{'' if args.gs_source == 'both' else '_' + args.gs_source}" if args.gs else "mamlpp"
    with common.Run(args, name) as run:  # SIGINT/SIGTERM: save at the next step
        args = run.args  # --vmap auto decided for the device
        data = run.load_data()  # training task sampler, fixed validation and test tasks, on the device
        params = init_params(args, data.image_shape, run.device)  # what the outer Adam learns
        state = init_state(args)  # the stored ĝ_1..ĝ_K, carried from one meta-iteration to the next
        adam = torch.optim.Adam(params.values(), lr=args.outer_lr)
        run.restore(params, state, adam, data.sampler)  # the run directory; --resume: all four from last.pt
        for epoch in run.epochs():
            if args.cosine:  # CA: this epoch's outer learning rate
                for group in adam.param_groups:
                    group["lr"] = cosine_lr(epoch, args)
            for tasks in run.iterations(data.sampler):  # --iters-per-epoch batches of --tasks tasks, alike in all
                # torchrun/srun: this process adapts its share of the batch; the all-reduces over processes are
                # inner_step's Σ_t ∇L_t (through which the meta-gradient flows) and meta_gradient's mean
                mine = common.my_share(tasks)  # one process: the whole batch
                result = meta_gradient(params, state, mine, epoch, args)  # MSL weights and DA by epoch
                if run.accept(result):  # finite (else skipped and counted: a diverging run stops)
                    for name, p in params.items():
                        p.grad = result.grads[name]
                    adam.step()
                    state.update(result.state)  # the new ĝ
            run.validate(lambda tasks: predict(params, state, tasks, args), data.val)  # keeps the best checkpoints
        return run.meta_test(lambda params, state, tasks: predict(params, state, tasks, args), data.test)


if __name__ == "__main__":
    main()

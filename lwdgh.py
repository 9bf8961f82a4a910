"""MAML with layer-wise dynamic gradient harmonisation (LWDGH) and the explore-exploit schedule (EE).

Paper: "Dynamic Gradient Harmonization for Meta-Learning" (shared/papers/004): Eq. 3 (GCI), Eq. 4
(layer-wise harmonisation), Section 3.4 (explore-exploit schedule). Inner loop: plain second-order MAML.

For the T tasks t of a batch and every layer ℓ (names in `meta_gradient` and `harmonise`):
    g_t^ℓ  = ∇_θℓ L_t^query(θ_{t,K})                                  per-task meta-gradient   `task_grads`
    ḡ^ℓ    = (1/T) Σ_t g_t^ℓ                                           plain MAML gradient      `mean`
    GCI_t^ℓ = ‖g_t^ℓ‖ (1 − cos(g_t^ℓ, ḡ^ℓ)) = ‖g_t^ℓ‖ − g_t^ℓ·ḡ^ℓ / ‖ḡ^ℓ‖       (Eq. 3)  `gci`
    w_t^ℓ  = softmax_t(−GCI_t^ℓ);  g_u^ℓ = Σ_t w_t^ℓ g_t^ℓ                      (Eq. 4)  `weights`, `harmonised`
    p_e    = p_min + ½(p_max − p_min)(1 + cos(π·min(e, E)/E))             (Section 3.4)  `explore_probability`
Each meta-iteration explores with probability p_e (Adam gets ḡ, the MAML update) and exploits otherwise
(Adam gets g_u); e is the epoch (from 0), E = round(--transition · --epochs) the transition epoch.

Decisions where the paper is silent (shared/DESIGN.md):
- A layer is one parameter tensor (conv weight and bias, BatchNorm scale and shift are separate layers).
- Per-task meta-gradients in one backward pass: each task adapts its own copy of θ, a (tasks, ...) leaf;
  tasks share nothing, so row t of d(Σ_t L_t)/d(copies) is g_t. Same cost as MAML's backward.
- ‖ḡ^ℓ‖ = 0 (all tasks cancel) counts as cos = 0: GCI_t^ℓ = ‖g_t^ℓ‖, never a division by zero.
- The paper gives no p_min, p_max: defaults 0 and 1 (explore always at the start, exploit always from E
  on). --schedule fixed is the paper's "fixed" mode of Table 6: p_max before E, p_min from E on.
- The explore/exploit draw comes from a generator seeded with --seed whose state lives in `state`
  (resume is exact); the global RNG is never touched. --no-ee sets p = 0 (always exploit).
- Logged per epoch (means over the epoch's finite meta-iterations, kept in `state` per epoch):
  gci_mean / gci_harmonised: Eq. 3 over the whole θ, summed over tasks, w.r.t. ḡ / g_u. gci_mean is Table 5's
  GCI column (each method measured along its own trajectory); Σ_t GCI_t is smallest for a reference along ḡ
  (Cauchy-Schwarz), so gci_harmonised >= gci_mean always: it says how far g_u turns away from ḡ;
  explore_fraction; weight_entropy: entropy of w^ℓ over tasks, mean over layers (log T = uniform).
- --p-min 1 --p-max 1 explores always: plain MAML with the paper's settings and the GCI logged.

Defaults follow the paper's setting (fmu2/PyTorch-MAML, DESIGN.md): task batch 4, inner lr 0.01, 5 inner
steps at meta-training, 10 at evaluation, Adam 1e-3, Conv4 with 32 filters (the paper's 32.9k parameters).
The paper gives no epoch count for Tables 1 and 4: the 300 epochs of 200 meta-iterations below are our
assumption, not checked against the paper's code (Table 5 states 200 per epoch).
Reproduces paper 004 (first command MAML, second MAML+LWDGH+EE):
    Table 1, MiniImagenet 5-way 1-shot and 5-shot:
        python lwdgh.py --dataset miniimagenet --shots 1 --filters 32 --epochs 300 --iters-per-epoch 200 --p-min 1 --p-max 1
        python lwdgh.py --dataset miniimagenet --shots 1 --filters 32 --epochs 300 --iters-per-epoch 200
        python lwdgh.py --dataset miniimagenet --shots 5 --filters 32 --epochs 300 --iters-per-epoch 200 --p-min 1 --p-max 1
        python lwdgh.py --dataset miniimagenet --shots 5 --filters 32 --epochs 300 --iters-per-epoch 200
    Table 4, CUB 5-way 1-shot and 5-shot:
        python lwdgh.py --dataset cub --shots 1 --filters 32 --epochs 300 --iters-per-epoch 200 --p-min 1 --p-max 1
        python lwdgh.py --dataset cub --shots 1 --filters 32 --epochs 300 --iters-per-epoch 200
        python lwdgh.py --dataset cub --shots 5 --filters 32 --epochs 300 --iters-per-epoch 200 --p-min 1 --p-max 1
        python lwdgh.py --dataset cub --shots 5 --filters 32 --epochs 300 --iters-per-epoch 200
    Table 5, MiniImagenet 5-way 1-shot, 20 epochs of 200 (rows MAML, MAML+LWDGH, MAML+LWDGH+EE; GCI column
    = gci_mean in metrics.csv):
        python lwdgh.py --dataset miniimagenet --shots 1 --filters 32 --epochs 20 --iters-per-epoch 200 --p-min 1 --p-max 1
        python lwdgh.py --dataset miniimagenet --shots 1 --filters 32 --epochs 20 --iters-per-epoch 200 --no-ee
        python lwdgh.py --dataset miniimagenet --shots 1 --filters 32 --epochs 20 --iters-per-epoch 200
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal

import torch
import torch.nn.functional as F

import common


@dataclass
class Args(common.Args):
    tasks: int = 4
    """task batch size: tasks per meta-iteration (the paper: 4)"""
    inner_steps: int = 5
    """inner-loop steps K at meta-training"""
    test_inner_steps: int = 10
    """inner-loop steps at meta-validation and meta-test"""
    inner_lr: float = 0.01
    """inner-loop learning rate α"""
    ee: bool = True
    """explore-exploit schedule (--ee), or always exploit (--no-ee: LWDGH alone)"""
    p_min: float = 0.0
    """smallest probability of an explore step (plain mean gradient)"""
    p_max: float = 1.0
    """largest probability of an explore step"""
    transition: float = 0.33
    """transition epoch E as a fraction of --epochs"""
    schedule: Literal["cosine", "fixed"] = "cosine"
    """explore probability before E: cosine from p_max to p_min, or fixed at p_max (p_min from E on either way)"""
    first_order: bool = False
    """first-order approximation: no gradient through the inner-loop gradients"""
    recompute: bool = False
    """gradient checkpointing: recompute each inner step but the last in the backward pass; less memory, more time"""

    def check(self) -> list[str]:
        problems = super().check()
        for name in ("inner_steps", "test_inner_steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if not self.inner_lr > 0:
            problems.append(f"--inner-lr must be positive, got {self.inner_lr}")
        if not 0 <= self.p_min <= self.p_max <= 1:
            problems.append(f"need 0 <= --p-min <= --p-max <= 1, got {self.p_min} and {self.p_max}")
        if not 0 <= self.transition <= 1:
            problems.append(f"--transition must be a fraction in [0, 1], got {self.transition}")
        return problems


STATS = ("gci_mean", "gci_harmonised", "explore_fraction", "weight_entropy")  # logged per epoch


def explore_probability(epoch: int, *, transition_epoch: int, p_min: float, p_max: float,
                        schedule: str) -> float:
    """p_e of Section 3.4 for epoch e (from 0); p_min from the transition epoch E on (E = 0: always)."""
    if epoch >= transition_epoch:
        return p_min
    if schedule == "fixed":
        return p_max
    return p_min + 0.5 * (p_max - p_min) * (1 + math.cos(math.pi * epoch / transition_epoch))


def gci(task_grads: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Eq. 3 per task: ‖g_t‖ (1 − cos(g_t, r)) = ‖g_t‖ − g_t·r/‖r‖; task_grads (tasks, n), r (n,) -> (tasks,).

    The second form needs no ‖g_t‖ in a denominator; ‖r‖ = 0 gives g_t·r = 0, i.e. cos = 0.
    """
    ref_norm = reference.norm().clamp_min(torch.finfo(reference.dtype).tiny)
    return task_grads.norm(dim=1) - task_grads @ reference / ref_norm


def harmonise(task_grads: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Eq. 4 for every layer: per-task gradients (tasks, ...) -> g_u per layer, weights w (layers, tasks)."""
    harmonised, weights = {}, []
    for name, g in task_grads.items():
        flat = g.flatten(1)  # (tasks, n_ℓ)
        w = torch.softmax(-gci(flat, flat.mean(0)), dim=0)  # (tasks,), tasks close to ḡ^ℓ weigh more
        harmonised[name] = torch.tensordot(w, g, dims=1)  # Σ_t w_t^ℓ g_t^ℓ, the layer's shape
        weights.append(w)
    return harmonised, torch.stack(weights)


def inner_step(fast: dict[str, torch.Tensor], x_s: torch.Tensor, y_s: torch.Tensor, *,
               inner_lr: float, create_graph: bool, use_vmap: bool) -> dict[str, torch.Tensor]:
    """One plain MAML step θ_{t,k+1} = θ_{t,k} − α ∇L_t(θ_{t,k}) for every task, (tasks, ...) per tensor."""
    logits = common.forward_tasks(common.conv4_forward, fast, x_s, use_vmap)  # (tasks, ways*shots, ways)
    # Σ_t L_t, each L_t a mean over task t's own support set. Tasks share nothing in the forward pass,
    # so one backward gives every task's gradient w.r.t. its own fast weights: ∇L_t, (tasks, ...).
    loss = F.cross_entropy(logits.flatten(0, 1), y_s.flatten(), reduction="sum") / y_s.shape[1]
    grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
    return {name: w - inner_lr * g for (name, w), g in zip(fast.items(), grads)}


def inner_loop(fast: dict[str, torch.Tensor], x_s: torch.Tensor, y_s: torch.Tensor, *, inner_steps: int,
               inner_lr: float, create_graph: bool, use_vmap: bool, recompute: bool = False):
    """Adapt every task of the batch: K plain MAML steps from θ_{t,0}, (tasks, ...) per tensor.

    x_s (tasks, ways*shots, C, H, W), y_s (tasks, ways*shots). Returns θ_{t,K}, (tasks, ...) per tensor.
    recompute: keep only the input of steps 1..K-1 and recompute each in the backward pass (gradient
    checkpointing; step K, the first the backward needs, stays stored): the same gradients with less
    memory, for one more forward-backward per earlier step.
    """
    step = partial(inner_step, x_s=x_s, y_s=y_s, inner_lr=inner_lr, create_graph=create_graph, use_vmap=use_vmap)
    for k in range(inner_steps):
        # The last step is the first the backward needs: it stays stored (as in checkpoint_sequential).
        recomputed = recompute and k < inner_steps - 1
        fast = common.checkpoint(step, fast) if recomputed else step(fast)
    return fast


def task_gradients(params: dict[str, torch.Tensor], tasks: common.Tasks, *, inner_steps: int, inner_lr: float,
                   first_order: bool, use_vmap: bool, recompute: bool = False):
    """Every task's meta-gradient g_t = ∇_θ L_t^query(θ_{t,K}), (tasks, ...) per tensor; Σ_t L_t; accuracy (tasks,)."""
    num_tasks = tasks.x_s.shape[0]
    # On the loop path one task at a time: the same gradients with 1/T of the memory (tasks are independent).
    groups = [slice(None)] if use_vmap else [slice(t, t + 1) for t in range(num_tasks)]
    loss, accs, rows = 0.0, [], []
    for group in groups:
        size = tasks.x_s[group].shape[0]
        # θ_{t,0}: one copy of θ per task, (size, ...), so that the backward keeps the tasks' gradients apart.
        copies = {name: p.detach().expand(size, *p.shape).clone().requires_grad_() for name, p in params.items()}
        fast = inner_loop(copies, tasks.x_s[group], tasks.y_s[group], inner_steps=inner_steps, inner_lr=inner_lr,
                          create_graph=not first_order, use_vmap=use_vmap, recompute=recompute)
        # d L_t / d θ_{t,K} per task (weight 1: each task's own loss), then one backward through the inner loop.
        group_loss, group_acc, d_fast = common.query_loss_grads(fast, tasks.x_q[group], tasks.y_q[group], 1.0, use_vmap)
        rows.append(torch.autograd.grad(list(fast.values()), list(copies.values()), list(d_fast.values())))
        loss, accs = loss + group_loss, accs + [group_acc]
    task_grads = {name: torch.cat(parts) for name, parts in zip(params, zip(*rows))}
    return task_grads, loss, torch.cat(accs)


def meta_gradient(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, epoch: int, *,
                  explore_prob: Callable[[int], float], inner_steps: int, inner_lr: float, first_order: bool,
                  use_vmap: bool, recompute: bool = False) -> common.StepResult:
    """One meta-iteration: per-task meta-gradients, then ḡ (explore) or g_u (exploit) for Adam."""
    task_grads, loss, acc = task_gradients(params, tasks, inner_steps=inner_steps, inner_lr=inner_lr,
                                           first_order=first_order, use_vmap=use_vmap, recompute=recompute)
    mean = {name: g.mean(0) for name, g in task_grads.items()}  # ḡ^ℓ: the MAML meta-gradient
    harmonised, weights = harmonise(task_grads)  # g_u^ℓ, w (layers, tasks)
    generator = torch.Generator()
    generator.set_state(state["rng"].cpu())
    explore = torch.rand((), generator=generator).item() < explore_prob(epoch)
    # Conflict numbers of this step over the whole θ: Eq. 3 summed over tasks, w.r.t. ḡ and w.r.t. g_u.
    flat = torch.cat([g.flatten(1) for g in task_grads.values()], dim=1)  # (tasks, n)
    step_stats = {"gci_mean": gci(flat, torch.cat([g.flatten() for g in mean.values()])).sum(),
                  "gci_harmonised": gci(flat, torch.cat([g.flatten() for g in harmonised.values()])).sum(),
                  "explore_fraction": torch.tensor(float(explore), dtype=flat.dtype, device=flat.device),
                  "weight_entropy": torch.special.entr(weights).sum(1).mean()}
    # Epoch means from sums kept per epoch: the loop keeps `state` only after a finite step, so they count
    # exactly the steps that updated θ, and they restart when the epoch changes.
    same_epoch = state["epoch"] == epoch
    sums = {name: (state["sums"][name] if same_epoch else 0) + value.detach() for name, value in step_stats.items()}
    new_state = {"rng": generator.get_state(), "epoch": epoch, "steps": (state["steps"] if same_epoch else 0) + 1,
                 "sums": sums}
    grads = mean if explore else harmonised
    return common.StepResult(loss / tasks.x_s.shape[0], acc.mean(), grads, new_state)


def predict(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, *,
            inner_steps: int, inner_lr: float, use_vmap: bool) -> torch.Tensor:
    """Adapt θ to every task (plain MAML steps), return query logits (tasks, ways*queries, ways)."""
    num_tasks = tasks.x_s.shape[0]
    with torch.enable_grad():
        fast = {name: p.detach().expand(num_tasks, *p.shape).requires_grad_() for name, p in params.items()}
        fast = inner_loop(fast, tasks.x_s, tasks.y_s, inner_steps=inner_steps, inner_lr=inner_lr,
                          create_graph=False, use_vmap=use_vmap)
    with torch.no_grad():
        return common.forward_tasks(common.conv4_forward, fast, tasks.x_q, use_vmap)


def scalars(params: dict[str, torch.Tensor], state: dict) -> dict[str, float]:
    """Epoch means of the conflict numbers (STATS) over the last epoch's finite meta-iterations."""
    if state["steps"] == 0:
        return {name: math.nan for name in STATS}
    return {name: (state["sums"][name] / state["steps"]).item() for name in STATS}


def make_algorithm(args: Args, image_shape: tuple[int, int, int], device: torch.device) -> common.Algorithm:
    """θ from the seed; the explore/exploit generator seeded with --seed; no epoch statistics yet."""
    theta = common.conv4_init(image_shape, args.ways, args.filters, generator=torch.Generator().manual_seed(args.seed))
    params = {name: p.to(device).requires_grad_() for name, p in theta.items()}
    vmap = common.use_vmap(args.vmap, device)
    p_min, p_max = (args.p_min, args.p_max) if args.ee else (0.0, 0.0)  # --no-ee: never explore
    explore_prob = partial(explore_probability, transition_epoch=round(args.transition * args.epochs),
                           p_min=p_min, p_max=p_max, schedule=args.schedule)
    # epoch −1: the first meta-iteration starts the sums of its epoch.
    state = {"rng": torch.Generator().manual_seed(args.seed).get_state(), "epoch": -1, "steps": 0, "sums": {}}
    return common.Algorithm(
        name="lwdgh_ee" if args.ee else "lwdgh", params=params, state=state,
        meta_gradient=partial(meta_gradient, explore_prob=explore_prob, inner_steps=args.inner_steps,
                              inner_lr=args.inner_lr, first_order=args.first_order, use_vmap=vmap,
                              recompute=args.recompute),
        predict=partial(predict, inner_steps=args.test_inner_steps, inner_lr=args.inner_lr, use_vmap=vmap),
        scalars=scalars)


if __name__ == "__main__":
    common.main(Args, make_algorithm, description=__doc__.splitlines()[0])

"""MAML with layer-wise dynamic gradient harmonisation (LWDGH) and the explore-exploit schedule (EE).

Paper: "Cross-Task Gradient Harmonization for Meta-Learning" (anonymous, under double-blind review; no arXiv
id): Eq. 3 (GCI), Eq. 4 (layer-wise harmonisation), Section 3.4 (explore-exploit schedule). Inner loop:
plain second-order MAML (C. Finn, P. Abbeel and S. Levine, arXiv 1703.03400).

For the T tasks t of a batch and every layer ℓ (names in `meta_gradient` and `harmonise`):
    g_t^ℓ  = ∇_θℓ L_t^query(θ_{t,K})                                  per-task meta-gradient   `task_grads`
    ḡ^ℓ    = (1/T) Σ_t g_t^ℓ                                           plain MAML gradient      `mean`
    GCI_t^ℓ = ‖g_t^ℓ‖ (1 − cos(g_t^ℓ, ḡ^ℓ)) = ‖g_t^ℓ‖ − g_t^ℓ·ḡ^ℓ / ‖ḡ^ℓ‖       (Eq. 3)  `gci`
    w_t^ℓ  = softmax_t(−GCI_t^ℓ);  g_u^ℓ = Σ_t w_t^ℓ g_t^ℓ                      (Eq. 4)  `weights`, `harmonised`
    p_e    = p_min + ½(p_max − p_min)(1 + cos(π·min(e, E)/E))             (Section 3.4)  `explore_probability`
Each meta-iteration explores with probability p_e (Adam gets ḡ, the MAML update) and exploits otherwise
(Adam gets g_u); e is the epoch (from 0), E = round(--transition · --epochs) the transition epoch.

Decisions where the paper is silent:
- Eq. 3 as printed is inconsistent (its right side (‖g_i‖ − g_i·ḡ)/‖ḡ‖ is ‖g_i‖(1 − cos) only if ‖ḡ‖ = 1):
  we use the left side, per task and layer.
- A layer is one parameter tensor (conv weight and bias, BatchNorm scale and shift are separate layers).
- Per-task meta-gradients in one backward pass: each task adapts its own copy of θ, a (tasks, ...) leaf;
  tasks share nothing, so row t of d(Σ_t L_t)/d(copies) is g_t. Same cost as MAML's backward.
- ‖ḡ^ℓ‖ = 0 (all tasks cancel) counts as cos = 0: GCI_t^ℓ = ‖g_t^ℓ‖. The paper gives no p_min, p_max: 0 and 1
  (explore at the start, exploit from E on); --schedule fixed (Table 6): p_max before E, p_min from E on.
- The explore/exploit draw comes from a generator seeded with --seed whose state lives in `state`
  (resume is exact); the global RNG is never touched. --no-ee sets p = 0 (always exploit).
- Logged per epoch (`metrics`, averaged over the epoch's finite meta-iterations): gci_mean / gci_harmonised:
  Eq. 3 over the whole θ, summed over tasks, w.r.t. ḡ / g_u (gci_mean: Table 5's GCI column; gci_harmonised >=
  gci_mean, Cauchy-Schwarz); explore_fraction; weight_entropy (of w^ℓ over tasks, mean over layers). Per task
  (`per_task`, tasks.csv: the first meta-iterations of each epoch): L_t and GCI_t (Figure 2).
- --p-min 1 --p-max 1 is plain MAML (GCI logged); --backbone resnet12 is fmu2's ResNet-12 (Tables 2, 3).
- --dataset sinusoid (regression, not in the paper): the 1-40-40-1 MLP, L_t the squared error; each of its weight and
  bias tensors is a layer ℓ of Eq. 5, as Conv4's are.

How it runs: `main`, at the end of this file, shows meta-training in order: the outer Adam on θ, the epochs of
meta-iterations (`meta_gradient` on a fresh task batch: explore or exploit, then the Adam step), meta-validation
with `predict` after every epoch (the training inner steps), and the meta-test of the 5 best checkpoints'
ensemble with --test-inner-steps. common.py holds the plumbing only: data, the network, run directory, logs.
Several processes (torchrun, srun; one per GPU): each adapts its equal share of the same batch (`main`);
`harmonise` all-reduces Σ_t g_t^ℓ (ḡ), all-gathers every task's GCI_t^ℓ (the softmax runs over all tasks) and
all-reduces Σ_t w_t^ℓ g_t^ℓ (g_u): N processes compute the one-process ḡ and g_u.

Defaults: the paper's (task batch 4, inner lr 0.01, 5 inner steps in training, 10 at meta-test, Adam 1e-3,
Conv4-32: 32.9k parameters) and, where it is silent, its code base's (fmu2/PyTorch-MAML, public copy
shirleyzhu233/PyTorch-MAML: train.py, configs/convnet4/mini-imagenet/*/*_reproduce.yaml): validation with
the training inner loop, BatchNorm not adapted (frozen: bn; --adapt-bn), meta-gradients clamped to ±10
(--clip-grad, clip_grad_value_), 300 epochs of 200 meta-iterations, meta-test queries 1 per class at 1-shot
and 5 at 5-shot (--test-queries). The paper's intervals fit those: 600 tasks of 5 queries at 48% give
±1.96·√(.48·.52/5)/√600 = ±1.79 points from the binomial spread alone (the paper: ±1.75; 75 queries: ±0.46).
Reproduces Tables 1-6 (MiniImagenet; tieredImageNet; ResNet-12; CUB; the ablation and the transition epoch, 20
epochs), MAML (--p-min 1 --p-max 1) against MAML+LWDGH(+EE), e.g. (--iters-per-epoch 200; 5-shot: --test-queries 5)
    python lwdgh.py --dataset miniimagenet --shots 1 --filters 32 --epochs 300 --test-queries 1 --p-min 1 --p-max 1
    python lwdgh.py --dataset tieredimagenet --shots 1 --backbone resnet12 --epochs 300 --test-queries 1
`make reproduce-lwdgh` runs every row (Table 6: --transition 0.2 --schedule fixed, ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.utils.checkpoint

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
    clip_grad: float = 10.0
    """clamp each element of the meta-gradient handed to Adam to ±this value (fmu2's clip_grad_value_); 0: off"""
    recompute: bool = False
    """gradient checkpointing: recompute the query pass and each inner step but the last in the backward pass"""

    def check(self) -> list[str]:
        problems = super().check()
        for name in ("inner_steps", "test_inner_steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if not self.inner_lr > 0:
            problems.append(f"--inner-lr must be positive, got {self.inner_lr}")
        if not 0 <= self.p_min <= self.p_max <= 1:
            problems.append(f"need 0 <= --p-min <= --p-max <= 1, got {self.p_min} and {self.p_max}")
        if not self.clip_grad >= 0:
            problems.append(f"--clip-grad must be 0 (off) or positive, got {self.clip_grad}")
        if not 0 <= self.transition <= 1:
            problems.append(f"--transition must be a fraction in [0, 1], got {self.transition}")
        changed = [f"--{f.name.replace('_', '-')}" for f in fields(self)
                   if f.name in ("p_min", "p_max", "schedule", "transition") and getattr(self, f.name) != f.default]
        if not self.ee and changed:
            problems.append(f"--no-ee never explores: {' and '.join(changed)} would have no effect; drop one side")
        return problems


def explore_probability(epoch: int, args: Args) -> float:
    """p_e of Section 3.4 for epoch e (from 0); p_min from the transition epoch E on (E = 0: always)."""
    p_min, p_max = (args.p_min, args.p_max) if args.ee else (0.0, 0.0)  # --no-ee: never explore
    transition_epoch = round(args.transition * args.epochs)
    if epoch >= transition_epoch:
        return p_min
    if args.schedule == "fixed":
        return p_max
    return p_min + 0.5 * (p_max - p_min) * (1 + math.cos(math.pi * epoch / transition_epoch))


def gci(task_grads: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Eq. 3 per task: ‖g_t‖ (1 − cos(g_t, r)) = ‖g_t‖ − g_t·r/‖r‖; task_grads (tasks, n), r (n,) -> (tasks,).

    The second form needs no ‖g_t‖ in a denominator; ‖r‖ = 0 gives g_t·r = 0, i.e. cos = 0.
    """
    ref_norm = reference.norm().clamp_min(torch.finfo(reference.dtype).tiny)
    return task_grads.norm(dim=1) - task_grads @ reference / ref_norm


def harmonise(task_grads: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    """Eq. 4 for every layer: per-task gradients (tasks, ...) -> g_u per layer, weights w (layers, tasks), ḡ per layer.

    Several processes (each holds its share of the tasks' g_t): ḡ^ℓ from an all-reduce of Σ_t g_t^ℓ, every task's
    GCI_t^ℓ all-gathered (one number per task and layer) for the softmax over all tasks, then Σ_t w_t^ℓ g_t^ℓ
    all-reduced: exact, with two gradient-sized all-reduces rather than gathering every task's whole gradient.
    """
    names, count = list(task_grads), next(iter(task_grads.values())).shape[0] * common.processes()  # T
    sums = common.sum_over_processes([g.sum(0) for g in task_grads.values()])  # Σ_t g_t^ℓ over the whole batch
    mean = {name: total / count for name, total in zip(names, sums)}  # ḡ^ℓ, the layer's shape
    conflict = torch.stack([gci(g.flatten(1), mean[name].flatten()) for name, g in task_grads.items()])  # (layers, my)
    weights = torch.softmax(-common.gather_over_processes(conflict.T).T, dim=1)  # (layers, tasks): near ḡ^ℓ weighs more
    mine = common.my_share(weights.T).T  # (layers, my tasks)
    harmonised = common.sum_over_processes([torch.tensordot(w, g, dims=1) for w, g in zip(mine, task_grads.values())])
    return dict(zip(names, harmonised)), weights, mean  # g_u^ℓ = Σ_t w_t^ℓ g_t^ℓ, the layer's shape


def inner_step(fast: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], tasks: common.Tasks, args: Args,
               create_graph: bool) -> dict[str, torch.Tensor]:
    """One plain MAML step θ_{t,k+1} = θ_{t,k} − α ∇L_t(θ_{t,k}) for every task, (tasks, ...) per adapted tensor."""
    grads = common.support_grads(common.FORWARD[args.backbone], fast, tasks.x_s, tasks.y_s, create_graph=create_graph,
                                 use_vmap=args.vmap == "on", frozen=frozen)  # ∇L_t(θ_{t,k}), (tasks, ...)
    return {name: w - args.inner_lr * grads[name] for name, w in fast.items()}


def inner_loop(weights: dict[str, torch.Tensor], tasks: common.Tasks, args: Args, inner_steps: int,
               create_graph: bool) -> dict[str, torch.Tensor]:
    """Adapt every task of the batch: `inner_steps` plain MAML steps on its support set from θ_{t,0}.

    weights: θ_{t,0}, (tasks, ...) per tensor; tasks.x_s (tasks, ways*shots, C, H, W), tasks.y_s (tasks, ways*shots).
    Returns θ_{t,K}, (tasks, ...) per tensor; the frozen ones (BatchNorm's unless --adapt-bn) are θ_{t,0}'s.
    --recompute: torch.utils.checkpoint keeps only the inputs of steps 1..K-1 and recomputes each step in
    the backward pass; step K, the first the backward needs, stays stored (the query pass: forward_tasks).
    """
    fast, frozen = common.split_adapted(weights, args.adapt_bn)
    for k in range(inner_steps):
        if args.recompute and k < inner_steps - 1:
            fast = torch.utils.checkpoint.checkpoint(inner_step, fast, frozen, tasks, args, create_graph,
                                                     use_reentrant=False)
        else:
            fast = inner_step(fast, frozen, tasks, args, create_graph)
    return {**fast, **frozen}


def task_gradients(params: dict[str, torch.Tensor], tasks: common.Tasks, args: Args):
    """Every task's meta-gradient g_t = ∇_θ L_t^query(θ_{t,K}), (tasks, ...) per tensor; L_t (tasks,); accuracy."""
    num_tasks = tasks.x_s.shape[0]
    # θ_{t,0}: one copy of θ per task, (tasks, ...) leaves, so that the backward keeps the tasks' gradients apart.
    copies = {name: p.detach().expand(num_tasks, *p.shape).clone().requires_grad_() for name, p in params.items()}
    fast = inner_loop(copies, tasks, args, args.inner_steps, create_graph=not args.first_order)
    logits = common.forward_tasks(common.FORWARD[args.backbone], fast, tasks.x_q, args.vmap == "on",
                                  args.recompute)  # (tasks, ways*queries, ways)
    # L_t^query, the mean over task t's queries (tasks,): row t of the gradient of Σ_t L_t w.r.t. the copies is g_t.
    losses = common.task_loss(logits.flatten(0, 1), tasks.y_q.flatten(0, 1), reduction="none").view(num_tasks, -1)
    losses = losses.mean(1)  # (tasks,)
    task_grads = dict(zip(copies, torch.autograd.grad(losses.sum(), list(copies.values()))))
    return task_grads, losses.detach(), common.score(logits.detach(), tasks.y_q).mean()


def meta_gradient(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, epoch: int,
                  args: Args) -> common.StepResult:
    """One meta-iteration: per-task meta-gradients g_t, then ḡ (explore) or g_u (exploit) for Adam."""
    task_grads, losses, acc = task_gradients(params, tasks, args)  # several processes: my tasks' g_t
    harmonised, weights, mean = harmonise(task_grads)  # g_u^ℓ, w (layers, tasks), ḡ^ℓ (the MAML meta-gradient)
    generator = torch.Generator()
    generator.set_state(state["rng"])  # on the host (common._to keeps it there on every device)
    # A number of a CPU generator: host memory on every device, no wait for the device
    explore = torch.rand((), generator=generator).item() < explore_probability(epoch, args)
    # Conflict numbers of this step over the whole θ: Eq. 3 summed over tasks, w.r.t. ḡ and w.r.t. g_u.
    flat = torch.cat([g.flatten(1) for g in task_grads.values()], dim=1)  # (tasks, n)
    task_gci = gci(flat, torch.cat([g.flatten() for g in mean.values()]))  # (tasks,): Figure 2's GCI of each task
    harmonised_gci = gci(flat, torch.cat([g.flatten() for g in harmonised.values()]))
    sums = common.sum_over_processes([torch.stack([task_gci.sum(), harmonised_gci.sum()])])[0]  # over the batch
    metrics = {"gci_mean": sums[0], "explore_fraction": float(explore), "gci_harmonised": sums[1],
               "weight_entropy": torch.special.entr(weights).sum(1).mean()}  # tensors: read once per epoch
    grads = mean if explore else harmonised
    if args.clip_grad > 0:  # as fmu2's train.py: every element of every meta-gradient, before the outer step
        grads = {name: g.clamp(-args.clip_grad, args.clip_grad) for name, g in grads.items()}
    return common.StepResult(losses.mean(), acc, grads, {"rng": generator.get_state()}, metrics,
                             per_task={"loss": losses, "gci": task_gci})


def predict(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, args: Args,
            inner_steps: int | None = None) -> torch.Tensor:
    """Query logits (tasks, ways*queries, ways) after adapting θ to every task with `inner_steps` (None: the
    training --inner-steps, meta-validation's as in fmu2's train.py; `main` gives --test-inner-steps at meta-test)."""
    with torch.enable_grad():
        fast = {name: p.detach().expand(tasks.x_s.shape[0], *p.shape).requires_grad_() for name, p in params.items()}
        fast = inner_loop(fast, tasks, args, inner_steps or args.inner_steps, create_graph=False)
    with torch.no_grad():
        return common.forward_tasks(common.FORWARD[args.backbone], fast, tasks.x_q, args.vmap == "on")


def init_params(args: Args, image_shape: tuple[int, int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """The meta-parameters, leaves on `device`: θ (--backbone) from the seed."""
    return {name: p.to(device).requires_grad_() for name, p in common.init_backbone(args, image_shape).items()}


def init_state(args: Args) -> dict:
    """What one meta-iteration hands the next (`state`): the explore/exploit draws' generator, from --seed."""
    return {"rng": torch.Generator().manual_seed(args.seed).get_state()}


def main(argv: list[str] | None = None) -> dict:
    """Meta-train with the outer Adam (explore or exploit each meta-iteration), meta-validate after every epoch,
    meta-test the top-5 ensemble with --test-inner-steps. common.Run is the plumbing: run directory, checkpoints,
    signals, logs. Returns result.json's dict."""
    args = common.parse_args(Args, argv, __doc__.splitlines()[0])  # --resume: the run's own arguments
    with common.Run(args, "lwdgh_ee" if args.ee else "lwdgh") as run:  # SIGINT/SIGTERM: save at the next step
        args = run.args  # --vmap auto decided for the device
        data = run.load_data()  # training task sampler, fixed validation and test tasks, on the device
        params = init_params(args, data.image_shape, run.device)  # what the outer Adam learns: θ
        state = init_state(args)  # the explore/exploit draws' generator
        adam = torch.optim.Adam(params.values(), lr=args.outer_lr)
        run.restore(params, state, adam, data.sampler)  # the run directory; --resume: all four from last.pt
        for epoch in run.epochs():
            for tasks in run.iterations(data.sampler):  # --iters-per-epoch batches of --tasks tasks, alike in all
                # torchrun/srun: this process adapts its share of the batch; harmonise's all-reduces and all-gather
                # make ḡ, the softmax over all tasks and g_u the batch's
                mine = common.my_share(tasks)  # one process: the whole batch
                # explores (ḡ) with probability explore_probability(epoch), else exploits (g_u); clamped to ±--clip-grad
                result = meta_gradient(params, state, mine, epoch, args)
                if run.accept(result):  # finite (else skipped and counted: a diverging run stops)
                    for name, p in params.items():
                        p.grad = result.grads[name]
                    adam.step()
                    state.update(result.state)  # the generator, advanced by one draw
            run.validate(lambda tasks: predict(params, state, tasks, args), data.val)  # keeps the best checkpoints
        return run.meta_test(lambda params, state, tasks: predict(params, state, tasks, args, args.test_inner_steps),
                             data.test)


if __name__ == "__main__":
    main()

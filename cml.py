"""Cooperative Meta-Learning (CML) on MAML, MAML++, BOIL or Sharp-MAML.

Paper: "Cooperative Meta-Learning with Gradient Augmentation", arXiv 2406.04639 (code JJongyn/CML): a co-learner
head, trained by the outer loop only, reads the adapted extractor's features; its loss adds gradient to θ's init.

Names (per task t of the batch, K inner steps, θ = Conv4 incl. its head (sinusoid: the MLP); φ = the co-learner):
    θ_{t,K}  = the base method's inner loop from θ, without gradient sharing         `inner_loop`
    z_t      = Conv4 blocks at θ_{t,K} on the query set, the last one before its pooling  `prepool_features`
    L_t^meta = CE(head_{θ_{t,K}}(pool(z_t)), y_q)       the base method's query loss    `meta_gradient`
    L_t^co   = CE(φ(z_t), y_q), φ = --colearner-blocks conv blocks, max-pool, linear    `colearner_forward`
    L        = (1/T) Σ_t L_t^meta + γ (1/T) Σ_t L_t^co, γ = --gamma                   `meta_gradient`
Outer step: Adam on (θ, φ) [and MAML++'s LSLR / per-step BN] with ∇L; φ is never adapted, nor used by `predict`.
Names in every function: `theta` = θ's tensors the inner loop adapts, `frozen` = the others (BN; BOIL: the head).
BOIL (J. Oh et al., arXiv 2008.08882): the maml base with θ's head frozen in the inner loop (its authors' main.py:
--classifier-step-size 0, the body at --extractor-step-size 0.5); `--gamma 0` is BOIL.
Sharp-MAML (M. Abbas et al., "Sharp-MAML: Sharpness-Aware Model-Agnostic Meta Learning", arXiv 2206.03996; code
mominabbass/Sharp-MAML): the maml base with sharpness-aware (SAM) steps, each a gradient taken at perturbed weights
and applied at the unperturbed ones, both inside `meta_gradient` (main's Adam unchanged); `--gamma 0` is Sharp-MAML:
    inner step  θ_{t,k} = θ_{t,k-1} − α ∇L_t(θ_{t,k-1} + ε_t),  ε_t = α_low ∇L_t / (‖∇L_t‖ + 1e-12)  `inner_step`
    outer step  Adam gets ∇L(θ + ε),  ε = α_up ∇L(θ) / (‖∇L(θ)‖ + 1e-12), ‖·‖ over every meta-parameter (θ, φ)
α_low = --sam-inner (0: Sharp-MAML_up), α_up = --sam-outer (0: Sharp-MAML_low); both 0.0005 by default: the variant
and radius of their MiniImagenet command (both/README.md, both/train_mini-sharpboth.py: one --alpha 0.0005 for both
radii). As their code: ε_t stays in the graph (their torchmeta/utils/gradient_based.py: the meta-gradient flows
through the perturbation and its norm), one norm per task over its adapted weights; ε is a constant
(sam.py's first_step, under no_grad) and ∇L(θ + ε) is second order through an inner loop run again from θ + ε on
the same tasks; the inner SAM also adapts at meta-test (lower/test.py). Each SAM doubles its loop's cost. Unlike
their code: BatchNorm stays the outer loop's here, as in every base (theirs adapts it, so their inner norm spans it:
--adapt-bn); train_loss, accuracy and grad_cos are logged at θ (their log: the pass at θ + ε).

Decisions (where the paper is silent):
- The base is a copy of mamlpp_gs.py --no-gs (loop, init, MSL, first-order epochs, clamp, cosine lr, prediction),
  which with fixed rates [α]·K and one BN per layer (the maml base) is maml_gs.py --no-gs step for step. At γ = 0
  the meta-gradient equals maml_gs.py's / mamlpp_gs.py's bitwise (tested). MAML++'s MSL applies to L^meta only
  (L^co at θ_{t,K}); its clamp to the summed network gradient, not φ's. z_t once per query pass, read by both heads
  (`both_heads`; MAML++ per-step BN: the last row). φ: Conv4 blocks of --filters, a linear layer; Xavier, zero biases.
- BatchNorm: the outer loop's (mamlpp: per-step rows); the reference's and BOIL's adapt it inner too: --adapt-bn.
- Regression (--dataset sinusoid, the paper's few-shot regression; its code has none): θ the 1-40-40-1 MLP, z_t its
  last hidden layer (the head's input, as Conv4's last block is), φ --colearner-blocks hidden layers of 40 and a
  linear output, initialised as θ; L^meta and L^co the squared error. Bases maml, boil (the body: fc{i}.*), sharpmaml.
- Unlike the reference (JJongyn/CML): one Adam for the run (train_cml.py: new ones every epoch); φ initialised like θ
  (there: PyTorch's default); it meta-tests the best validation model (our test_acc_best). --colearner-blocks 2 is
  its Conv(2); the paper finds Conv(0) best at 1-shot.
- Logged (`metrics`): loss_meta (MSL-weighted), loss_co; from every --grad-stats-every-th meta-iteration (a second
  backward) grad_cos, grad_norm_ratio ‖g_co‖/‖g_meta‖ of ∇L^meta, ∇L^co w.r.t. θ's conv and BN tensors.

How it runs: `main`, at the end of this file, shows meta-training in order: the outer Adam on θ and φ (MAML++:
each epoch's cosine learning rate), the epochs of meta-iterations (`meta_gradient` on a fresh task batch, then
the Adam step), meta-validation with `predict` (θ alone) after every epoch, and the meta-test of the 5 best
checkpoints' ensemble. common.py holds the plumbing only: data, the network, the run directory, checkpoints, logs.
Several processes (torchrun, srun; one per GPU): each adapts its equal share of the same batch (`main`), and the
meta-gradients are the mean over processes (`meta_gradient`, before the clipping and Sharp-MAML's outer norm).

Reproduces arXiv 2406.04639's 5-way 1-/5-shot rows (headline: MAML++ +CML, MiniImagenet 5-shot, 70.08%) on
MiniImagenet, Omniglot, CIFAR-FS, FC100 and VGG Flower, each base alone (--gamma 0) and with CML: MAML and BOIL as
run_cml.sh (task batch 4, one inner step of 0.5, 64 filters, 300 × 100 meta-iterations), MAML++ with mamlpp_gs.py's
defaults, task batch 2, Sharp-MAML as its authors' MiniImagenet command (task batch 4, 5 inner steps of 0.1, 64
filters, 600 × 100); e.g. (`make reproduce-cml` runs all)
    python cml.py --dataset cifarfs --base boil --shots 1 --tasks 4 --inner-steps 1 --inner-lr 0.5 --filters 64
    python cml.py --dataset miniimagenet --base mamlpp --shots 5 --tasks 2 --epochs 250 --clip-grad 10
    python cml.py --dataset fc100 --base sharpmaml --shots 1 --tasks 4 --inner-steps 5 --inner-lr 0.1 --epochs 600
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import common


@dataclass
class Args(common.Args):
    base: Literal["maml", "mamlpp", "boil", "sharpmaml"] = "maml"
    """base method whose inner loop adapts θ: maml (maml_gs.py --no-gs), mamlpp (mamlpp_gs.py --no-gs), boil,
    sharpmaml (maml with sharpness-aware steps)"""
    gamma: float = 1.0
    """weight γ of the co-learner's query loss in the outer loss"""
    colearner_blocks: int = 2
    """conv blocks of the co-learner before its max-pool and linear layer (the paper's Conv(n); 0: linear only)"""
    grad_stats_every: int = 10
    """log grad_cos / grad_norm_ratio from every N-th meta-iteration (each costs a second backward); 0: never"""
    inner_steps: int = 5
    """inner-loop steps K, at meta-training and meta-test"""
    inner_lr: float = 0.1
    """inner-loop learning rate α (MAML++: the initial value of every LSLR rate)"""
    first_order: bool = False
    """maml, boil, sharpmaml bases: first-order approximation: no gradient through the inner-loop gradients"""
    sam_inner: float = 0.0005
    """sharpmaml base: SAM radius of every inner step (Sharp-MAML's α_low); 0: no inner SAM"""
    sam_outer: float = 0.0005
    """sharpmaml base: SAM radius of the outer step (Sharp-MAML's α_up); 0: no outer SAM"""
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
    """gradient checkpointing: recompute the query pass and each inner step but the last in the backward pass"""
    backbones = ("conv4", "mlp")  # φ continues Conv4's last block (the reference's network), or the MLP's last layer

    def check(self) -> list[str]:
        problems = super().check()
        if self.inner_steps < 1:
            problems.append(f"--inner-steps must be a positive integer, got {self.inner_steps}")
        if not self.inner_lr > 0:
            problems.append(f"--inner-lr must be positive, got {self.inner_lr}")
        for name in ("msl_epochs", "first_order_epochs", "clip_grad", "grad_stats_every", "colearner_blocks", "gamma",
                     "sam_inner", "sam_outer"):
            if not getattr(self, name) >= 0:
                problems.append(f"--{name.replace('_', '-')} must be 0 or positive, got {getattr(self, name)}")
        if self.base == "mamlpp" and self.dataset in common.REGRESSION:
            problems.append(f"--base mamlpp: MAML++'s per-step BatchNorm is part of its Conv4 (the {self.dataset}'s "
                            f"MLP has none); run the {self.dataset} with --base maml, boil or sharpmaml")
        if self.adapt_bn and self.base == "mamlpp" and self.per_step_bn:
            problems.append("--adapt-bn needs --no-per-step-bn: per-step BN rows are learned by the outer loop only")
        if self.base == "mamlpp" and self.cosine and not 0 <= self.min_outer_lr <= self.outer_lr:
            problems.append(f"--min-outer-lr must lie in [0, --outer-lr = {self.outer_lr}], got {self.min_outer_lr}")
        problems += [f"--{f.name.replace('_', '-')} applies to --base {' or '.join(bases)} only"
                     for f in dataclasses.fields(Args) for bases in [BASE_ONLY.get(f.name, (self.base,))]
                     if self.base not in bases and getattr(self, f.name) != f.default]
        return problems

    def extra_weights(self) -> int:  # φ: its conv blocks (weight, bias, BN scale and shift) or hidden layers; its
        if self.backbone == "mlp":  # head is θ's size
            return self.colearner_blocks * (common.MLP_HIDDEN[-1] + 1) * common.MLP_HIDDEN[-1]
        return self.colearner_blocks * (self.filters ** 2 * common.CONV_KERNEL ** 2 + 3 * self.filters)


BASE_ONLY = {"first_order": ("maml", "boil", "sharpmaml"), "sam_inner": ("sharpmaml",), "sam_outer": ("sharpmaml",),
             **{name: ("mamlpp",) for name in ("lslr", "per_step_bn", "msl_epochs", "first_order_epochs", "cosine",
                                               "min_outer_lr", "clip_grad")}}  # flag -> the bases that read it
SAM_EPS = 1e-12  # Sharp-MAML's code: ε = ρ g / (‖g‖ + 1e-12), the SAM optimiser's (davda54/sam) guard
LSLR = "lslr."  # lslr.<name>: the learned inner learning rates of adapted tensor <name>, one per step (K,)
MSL_FLOOR = 0.03  # MSL: each non-final weight falls to at least MSL_FLOOR / K (the reference's value)
COLEARNER = "colearner."  # colearner.<name>: the co-learner's tensors φ, meta-parameters like θ
COLEARNER_SEED_OFFSET = 1  # φ's init generator: --seed + this
EXTRACTOR = ("conv", "bn", "fc")  # θ's feature extractor: conv{i}.* and bn{i}.* (the MLP: fc{i}.*), not the head


def colearner_init(net: dict[str, torch.Tensor], generator: torch.Generator, blocks: int) -> dict[str, torch.Tensor]:
    """φ for a Conv4 θ: `blocks` conv blocks and a linear layer; Xavier-uniform weights, zero biases, BN 1 and 0.
    For the sinusoid's MLP θ: `blocks` hidden layers of its width and a linear layer, initialised as θ."""
    head = net["head.weight"]  # (ways, filters·h'·w'), the same input size as φ's linear layer
    if "bn0.weight" not in net:  # the MLP: common.mlp_init's layers, from the last hidden layer to the output
        width, outputs = head.shape[1], head.shape[0]
        phi = common.mlp_init(width, outputs, (width,) * blocks, generator=generator, dtype=head.dtype)
        return {COLEARNER + name: p for name, p in phi.items()}
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


def init_params(args: Args, image_shape: tuple[int, int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """The meta-parameters, leaves on `device`: θ from the seed; mamlpp: BN rows as its BN, LSLR rates --inner-lr;
    φ from its own seed."""
    params = common.init_backbone(args, image_shape)  # Conv4 (or the sinusoid's MLP) from --seed
    if per_step_bn(args):  # K copies of conv4_init's BN scale 1 and shift 0, in place of the (C,) tensors
        params.update({name: p.expand(args.inner_steps, *p.shape).clone() for name, p in params.items()
                       if name.startswith(common.BN)})
    if args.base == "mamlpp" and args.lslr:
        adapted, _ = common.split_adapted(params, args.adapt_bn and not per_step_bn(args))
        params.update({LSLR + name: torch.full((args.inner_steps,), args.inner_lr) for name in adapted})
    generator = torch.Generator().manual_seed(args.seed + COLEARNER_SEED_OFFSET)
    params.update(colearner_init(params, generator, args.colearner_blocks))
    return {name: p.to(device).requires_grad_() for name, p in params.items()}


def init_state(args: Args) -> dict:
    """What one meta-iteration hands the next (`state`): the epoch and its meta-iterations so far."""
    return {"epoch": 0, "steps": 0}


def per_step_bn(args: Args) -> bool:  # the maml base: one BN tensor per layer
    return args.base == "mamlpp" and args.per_step_bn


def split_params(params: dict[str, torch.Tensor], args: Args):
    """params -> (θ's adapted tensors, θ's frozen ones: BN unless adapted, BOIL's head; LSLR rates or [inner_lr] * K;
    φ unprefixed)."""
    net = {name: p for name, p in params.items() if not name.startswith((COLEARNER, LSLR))}
    theta, frozen = common.split_adapted(net, args.adapt_bn and not per_step_bn(args))  # per-step BN: never adapted
    if args.base == "boil":  # the body only: the head joins the tensors the inner loop leaves alone
        frozen.update({name: theta.pop(name) for name in list(theta) if not name.startswith(EXTRACTOR)})
    lslr = {name: params.get(LSLR + name, [args.inner_lr] * args.inner_steps) for name in theta}
    phi = {name.removeprefix(COLEARNER): p for name, p in params.items() if name.startswith(COLEARNER)}
    return theta, frozen, lslr, phi


def frozen_at(frozen: dict[str, torch.Tensor], k: int, args: Args) -> dict[str, torch.Tensor]:
    """The frozen tensors of inner step k (from 0) and of the query forward after it, (tasks, ...) each: row k of
    each per-step BN tensor, or the frozen tensors as they are."""
    return {name: w[:, k] if per_step_bn(args) else w for name, w in frozen.items()}


def inner_step(k: int, fast: dict[str, torch.Tensor], frozen_k: dict[str, torch.Tensor], lslr: dict,
               tasks: common.Tasks, args: Args, create_graph: bool) -> dict[str, torch.Tensor]:
    """Inner step k+1 for every task of the batch (k counts from 0 and indexes the rates and BN rows).

    fast: θ_{t,k}, frozen_k: frozen_at(frozen, k), (tasks, ...) each. Returns θ_{t,k+1}."""
    def gradients(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # ∇L_t there, with BN row k
        return common.support_grads(common.FORWARD[args.backbone], weights, tasks.x_s, tasks.y_s,
                                    create_graph=create_graph, use_vmap=args.vmap == "on", frozen=frozen_k)
    grads = gradients(fast)  # ∇L_t(θ_{t,k})
    if args.base == "sharpmaml" and args.sam_inner > 0:  # SAM: the gradient at θ_{t,k} + ε_t, applied at θ_{t,k}
        norm = torch.linalg.vector_norm(torch.cat([g.flatten(1) for g in grads.values()], 1), dim=1)  # (tasks,)
        scale = args.sam_inner / (norm + SAM_EPS)  # ε_t = α_low ∇L_t / ‖∇L_t‖, in the graph (their code's)
        grads = gradients({name: w + scale.view(-1, *[1] * (w.dim() - 1)) * grads[name] for name, w in fast.items()})
    return {name: w - lslr[name][k] * grads[name] for name, w in fast.items()}  # LSLR: a rate per tensor, step


def inner_loop(theta: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], lslr: dict, tasks: common.Tasks,
               args: Args, create_graph: bool) -> list[dict[str, torch.Tensor]]:
    """Adapt θ to every task of the batch: K inner steps of the base method on its support set, without sharing.

    The tensors as split_params splits them: frozen, θ's tensors not adapted (BN: (K, C) per-step or (C,), none with
    --adapt-bn; BOIL: also the head); lslr, each adapted tensor's rates, (K,) or K floats when fixed (the maml base:
    [α] * K, maml_gs.py's step); tasks.x_s (tasks, ways*shots, C, H, W), tasks.y_s (tasks, ways*shots). Returns the
    trajectory [θ_{t,0}, ..., θ_{t,K}] (MSL needs every step), each a dict of (tasks, ...) tensors, θ_{t,j} (j ≥ 1)
    with the BN rows of step j (its query's too).
    --recompute: torch.utils.checkpoint keeps only the inputs of steps 1..K-1 and recomputes each step in the
    backward pass; step K stays stored.
    """
    count = tasks.x_s.shape[0]
    fast = {name: p.expand(count, *p.shape) for name, p in theta.items()}  # θ_{t,0} = θ, (tasks, ...)
    frozen = {name: p.expand(count, *p.shape) for name, p in frozen.items()}
    trajectory = [fast]
    for k in range(args.inner_steps):
        frozen_k = frozen_at(frozen, k, args)
        step_args = (k, fast, frozen_k, lslr, tasks, args, create_graph)
        if args.recompute and k < args.inner_steps - 1:
            fast = torch.utils.checkpoint.checkpoint(inner_step, *step_args, use_reentrant=False)
        else:
            fast = inner_step(*step_args)
        trajectory.append({**fast, **frozen_k})
    return trajectory


def msl_weights(epoch: int, args: Args) -> list[float] | None:
    """MSL weights w_1..w_K of the query losses at θ_1..θ_K in this epoch (as the reference); None: final step only."""
    if args.base != "mamlpp" or epoch >= args.msl_epochs:  # also msl_epochs = 0: MSL off
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


def prepool_features(net: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images -> z (N, filters, h, w): common.conv4_forward's blocks, the last one before its pooling.
    The MLP's points (N, 1) -> z (N, width): its last hidden layer, the head's input."""
    if "bn0.weight" not in net:
        return common.mlp_features(net, x)
    blocks = common.conv4_blocks(net)
    for i in range(blocks - 1):
        x = F.max_pool2d(common.conv_block(net, i, x), common.POOL)
    return common.conv_block(net, blocks - 1, x)


def colearner_forward(phi: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """φ on a pre-pooling feature map z (N, filters, h, w) -> (N, ways) logits: blocks, max-pool, linear. The MLP's:
    z (N, width) -> (N, 1) predictions: hidden layers, linear."""
    if z.dim() == 2:
        return common.mlp_forward(phi, z)
    for i in range(common.conv4_blocks(phi)):
        z = common.conv_block(phi, i, z)
    z = F.max_pool2d(z, common.POOL)  # only the last block pools: (N, filters, h // 2, w // 2)
    return F.linear(z.flatten(1), phi["head.weight"], phi["head.bias"])


def both_heads(phi: dict[str, torch.Tensor]):  # (net, x) -> the meta-learner's and the co-learner's logits, one z
    def forward(net: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:  # (N, 2·ways)
        z = prepool_features(net, x)
        pooled = z if z.dim() == 2 else F.max_pool2d(z, common.POOL).flatten(1)  # the head's input
        meta = F.linear(pooled, net["head.weight"], net["head.bias"])
        return torch.cat([meta, colearner_forward(phi, z)], dim=-1)
    return forward


def outer_losses(params: dict[str, torch.Tensor], tasks: common.Tasks, epoch: int, args: Args):
    """The base's adaptation from params, then its query loss L_meta, the co-learner's L_co and the accuracy."""
    theta, frozen, lslr, phi = split_params(params, args)
    create_graph = epoch >= args.first_order_epochs if args.base == "mamlpp" else not args.first_order
    trajectory = inner_loop(theta, frozen, lslr, tasks, args, create_graph)
    # The base's loss: MSL Σ_j w_j (1/T) Σ_t L_t^meta(θ_{t,j}) with BN row j − 1, or the final step's alone
    weights = msl_weights(epoch, args) or [0.0] * (args.inner_steps - 1) + [1.0]
    loss_meta = 0.0
    for j, weight in enumerate(weights, start=1):
        if j == args.inner_steps:  # at θ_{t,K} the co-learner reads the same z: (tasks, N_q, 2·ways)
            both = common.forward_tasks(both_heads(phi), trajectory[j], tasks.x_q, args.vmap == "on", args.recompute)
            logits, co_logits = both.chunk(2, dim=-1)
        elif weight:
            logits = common.forward_tasks(common.FORWARD[args.backbone], trajectory[j], tasks.x_q, args.vmap == "on",
                                          args.recompute)
        if weight:
            step_loss, acc = common.query_loss(logits, tasks.y_q)  # acc: at θ_{t,K}, the last step
            loss_meta = loss_meta + weight * step_loss
    loss_co, _ = common.query_loss(co_logits, tasks.y_q)  # (1/T) Σ_t L_t^co at θ_{t,K}
    return loss_meta, loss_co, acc


def meta_gradient(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, epoch: int,
                  args: Args) -> common.StepResult:
    """One meta-iteration: the base's adaptation and query loss, plus γ · the co-learner's query loss."""
    loss_meta, loss_co, acc = outer_losses(params, tasks, epoch, args)
    names, values = list(params), list(params.values())
    steps = state["steps"] if state["epoch"] == epoch else 0  # meta-iterations of this epoch so far
    apart = args.grad_stats_every > 0 and steps % args.grad_stats_every == 0  # the epoch's first one included
    if apart:  # g_meta and g_co in two backwards, for the gradient agreement; g = g_meta + γ g_co
        g_meta = torch.autograd.grad(loss_meta, values, retain_graph=True, materialize_grads=True)  # φ: zeros
        g_co = torch.autograd.grad(loss_co, values, materialize_grads=True)  # θ's head: zeros
        g_meta, g_co = (list(common.mean_over_processes(dict(enumerate(g))).values()) for g in (g_meta, g_co))
        grads = {name: gm + args.gamma * gc for name, gm, gc in zip(names, g_meta, g_co)}
    else:  # one backward: the same sum, half the work
        grads = dict(zip(names, torch.autograd.grad(loss_meta + args.gamma * loss_co, values)))
        grads = common.mean_over_processes(grads)  # several processes: the mean of their equal shares
    if args.base == "sharpmaml" and args.sam_outer > 0:  # SAM: ∇L at θ + ε, for main's Adam to apply at θ
        norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))  # over every meta-parameter (θ, φ)
        shifted = {name: (p.detach() + args.sam_outer / (norm + SAM_EPS) * grads[name]).requires_grad_()
                   for name, p in params.items()}  # ε = α_up g / ‖g‖, a constant (their SAM optimiser's step)
        shifted_meta, shifted_co, _ = outer_losses(shifted, tasks, epoch, args)  # the inner loop again, from θ + ε
        grads = dict(zip(names, torch.autograd.grad(shifted_meta + args.gamma * shifted_co, list(shifted.values()))))
        grads = common.mean_over_processes(grads)
    if args.clip_grad > 0:  # as mamlpp_gs.py: the network's meta-gradients only, not the LSLR rates (nor φ)
        network = [name for name in names if not name.startswith((LSLR, COLEARNER))]
        grads = {name: g.clamp(-args.clip_grad, args.clip_grad) if g is not None and name in network else g
                 for name, g in grads.items()}
    metrics = {"loss_meta": loss_meta.detach(), "loss_co": loss_co.detach()}  # tensors: read once per epoch
    if args.base == "mamlpp" and args.lslr:
        metrics["lslr_mean"] = torch.stack([p.detach() for name, p in params.items() if name.startswith(LSLR)]).mean()
    if apart:  # gradient agreement on the extractor (conv and BN tensors of θ), flattened: cosine and norm ratio
        flat_meta, flat_co = (torch.cat([g[i].flatten() for i, name in enumerate(names) if name.startswith(EXTRACTOR)])
                              for g in (g_meta, g_co))
        metrics.update(grad_cos=F.cosine_similarity(flat_meta, flat_co, dim=0),
                       grad_norm_ratio=flat_co.norm() / flat_meta.norm())
    # train_loss is the outer objective L_meta + γ·L_co; metrics.csv's loss_meta and loss_co give the two apart
    return common.StepResult((loss_meta + args.gamma * loss_co).detach(), acc, grads,
                             {"epoch": epoch, "steps": steps + 1}, metrics)


def predict(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, args: Args) -> torch.Tensor:
    """The base method's prediction, by the meta-learner only (no φ): query logits (tasks, ways*queries, ways)."""
    theta, frozen, lslr, _ = split_params({n: p.detach().requires_grad_() for n, p in params.items()}, args)
    with torch.enable_grad():
        trajectory = inner_loop(theta, frozen, lslr, tasks, args, create_graph=False)
    with torch.no_grad():
        return common.forward_tasks(common.FORWARD[args.backbone], trajectory[-1], tasks.x_q, args.vmap == "on")


def main(argv: list[str] | None = None) -> dict:
    """Meta-train with the outer Adam on θ and φ, meta-validate after every epoch (θ only), meta-test the top-5
    ensemble. common.Run is the plumbing: run directory, checkpoints, signals, logs. Returns result.json's dict."""
    args = common.parse_args(Args, argv, __doc__.splitlines()[0])  # --resume: the run's own arguments
    with common.Run(args, f"cml_{args.base}") as run:  # SIGINT/SIGTERM: save at the next step
        args = run.args  # --vmap auto decided for the device
        data = run.load_data()  # training task sampler, fixed validation and test tasks, on the device
        params = init_params(args, data.image_shape, run.device)  # what the outer Adam learns: θ, φ (, LSLR)
        state = init_state(args)  # meta-iterations of the epoch so far: the gradient statistics' pace
        adam = torch.optim.Adam(params.values(), lr=args.outer_lr)
        run.restore(params, state, adam, data.sampler)  # the run directory; --resume: all four from last.pt
        for epoch in run.epochs():
            if args.base == "mamlpp" and args.cosine:  # MAML++'s CA: this epoch's outer learning rate
                for group in adam.param_groups:
                    group["lr"] = cosine_lr(epoch, args)
            for tasks in run.iterations(data.sampler):  # --iters-per-epoch batches of --tasks tasks, alike in all
                # torchrun/srun: this process adapts its share of the batch; meta_gradient all-reduces the mean
                mine = common.my_share(tasks)  # one process: the whole batch
                # MAML++'s MSL weights and DA by epoch; every --grad-stats-every-th: g_meta, g_co apart
                result = meta_gradient(params, state, mine, epoch, args)
                if run.accept(result):  # finite (else skipped and counted: a diverging run stops)
                    for name, p in params.items():
                        p.grad = result.grads[name]
                    adam.step()
                    state.update(result.state)
            run.validate(lambda tasks: predict(params, state, tasks, args), data.val)  # keeps the best checkpoints
        return run.meta_test(lambda params, state, tasks: predict(params, state, tasks, args), data.test)


if __name__ == "__main__":
    main()

"""Cooperative Meta-Learning (CML) on MAML or MAML++.

Paper: "Cooperative Meta-Learning with Gradient Augmentation", arXiv 2406.04639 (CML, shared/papers/003;
reference code JJongyn/CML). A co-learner head, trained by the outer loop only, reads
the feature map of the adapted extractor; its query loss adds gradient to the extractor's initialisation.

Names (per task t of the batch, K inner steps, θ = Conv4 incl. its head, φ = the co-learner):
    θ_{t,K}  = the base method's inner loop from θ, unchanged                      `inner_loop` (maml_gs / mamlpp_gs)
    z_t      = Conv4 blocks at θ_{t,K} on the query set, the last one before its pooling  `prepool_features`
    L_t^meta = CE(head_{θ_{t,K}}(pool(z_t)), y_q)       the base method's query loss   `common.query_loss_grads`
    L_t^co   = CE(φ(z_t), y_q), φ = conv block (no pool), conv block + max-pool, linear   `colearner_forward`
    L        = (1/T) Σ_t L_t^meta + γ (1/T) Σ_t L_t^co, γ = --gamma                   `meta_gradient`
Outer step: Adam on (θ, φ) [and MAML++'s LSLR / per-step BN] with ∇L. φ is never adapted in the inner
loop and never used at evaluation: `predict` is the base method's, on the meta-learner's parameters only.

Decisions (shared/DESIGN.md; where the paper is silent):
- The base inner loop is imported from maml_gs.py / mamlpp_gs.py with gradient sharing off (m = λ = None), so
  it is the base method's by construction; the base's parameters and init come from its make_algorithm.
- z_t recomputes conv4_features' ops (conv, batch-statistics BN, ReLU, max-pool) and stops before the last
  pooling; with MAML++ per-step BN, the query forward uses BN row K, as the base's query loss.
- φ's blocks are Conv4's (3×3 conv, BN on batch statistics with learned scale/shift, ReLU), --filters
  channels; its linear layer has the meta-learner head's input size (same pooling). Xavier init, zero biases,
  from a generator seeded --seed + COLEARNER_SEED_OFFSET (independent of θ's draws).
- MAML++'s multi-step loss applies to L^meta only; L^co is taken at θ_{t,K}. MAML++'s clamp applies to the
  summed network gradient; φ's gradient is not clamped.
- Logged per epoch (means over the epoch's finite meta-iterations, kept in `state` as lwdgh.py does):
  loss_meta, loss_co (the two query losses; loss_meta MSL-weighted while MAML++'s MSL is on; the logged
  train_loss is loss_meta + γ loss_co), grad_cos and grad_norm_ratio = ‖g_co‖/‖g_meta‖ between
  g_meta = ∇L^meta and g_co = ∇L^co (γ not applied) w.r.t. the extractor's conv and BN tensors of θ
  (meta-gradients, through the inner loop). This costs a second backward through the inner loop.

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
import maml_gs
import mamlpp_gs

@dataclass
class Args(common.Args):
    base: Literal["maml", "mamlpp"] = "maml"
    """base method whose inner loop adapts θ: maml (maml_gs.py --no-gs) or mamlpp (mamlpp_gs.py --no-gs)"""
    gamma: float = 1.0
    """weight γ of the co-learner's query loss in the outer loss"""
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
    """gradient checkpointing: recompute each inner step in the backward pass; less memory, more time"""

    def check(self) -> list[str]:
        problems = self.base_args().check()
        if not self.gamma >= 0:
            problems.append(f"--gamma must be 0 or positive, got {self.gamma}")
        own = {f.name for f in dataclasses.fields(BASES[self.base].Args)} | {"base", "gamma"}
        other = "maml" if self.base == "mamlpp" else "mamlpp"
        problems += [f"--{f.name.replace('_', '-')} applies to --base {other} only" for f in dataclasses.fields(Args)
                     if f.name not in own and getattr(self, f.name) != f.default]
        return problems

    def base_args(self):
        """The base file's Args (maml_gs.Args or mamlpp_gs.Args) with these values and gradient sharing off."""
        cls = BASES[self.base].Args
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls) if f.name != "gs"}, gs=False)


BASES = {"maml": maml_gs, "mamlpp": mamlpp_gs}
COLEARNER = "colearner."  # colearner.<name>: the co-learner's tensors φ, meta-parameters like θ
COLEARNER_BLOCKS = 2  # conv block without pooling, then conv block with max-pool
COLEARNER_SEED_OFFSET = 1  # φ's init generator: --seed + this
EXTRACTOR = ("conv", "bn")  # θ's feature extractor: conv{i}.* and bn{i}.*, not the head
STATS = ("loss_meta", "loss_co", "grad_cos", "grad_norm_ratio")


def add_grads(totals: list[torch.Tensor | None], new: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
    """Element-wise sums of two lists of gradients, None meaning no gradient."""
    return [t if g is None else g if t is None else t + g for t, g in zip(totals, new)]


def prepool_features(net: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images -> (N, filters, h, w): conv4_features' ops, the last block stopped before its pooling."""
    blocks = common.conv4_blocks(net)
    for i in range(blocks):
        x = F.conv2d(x, net[f"conv{i}.weight"], net[f"conv{i}.bias"], padding=common.CONV_KERNEL // 2)
        x = F.relu(F.batch_norm(x, None, None, net[f"bn{i}.weight"], net[f"bn{i}.bias"], training=True))
        if i < blocks - 1:
            x = F.max_pool2d(x, common.POOL)
    return x


def colearner_forward(phi: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """φ on a pre-pooling feature map (N, filters, h, w) -> (N, ways) logits."""
    for i in range(COLEARNER_BLOCKS):
        z = F.conv2d(z, phi[f"conv{i}.weight"], phi[f"conv{i}.bias"], padding=common.CONV_KERNEL // 2)
        z = F.relu(F.batch_norm(z, None, None, phi[f"bn{i}.weight"], phi[f"bn{i}.bias"], training=True))
    z = F.max_pool2d(z, common.POOL)  # only the last block pools: (N, filters, h // 2, w // 2)
    return F.linear(z.flatten(1), phi["head.weight"], phi["head.bias"])


def colearner_init(net: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """φ for a Conv4 θ: Xavier-uniform conv and linear weights, zero biases, BN scale 1 and shift 0."""
    head = net["head.weight"]  # (ways, filters·h'·w'), the same input size as φ's linear layer
    filters, kw = net["bn0.weight"].shape[-1], dict(dtype=head.dtype)
    phi = {}
    for i in range(COLEARNER_BLOCKS):
        w = torch.empty(filters, filters, common.CONV_KERNEL, common.CONV_KERNEL, **kw)
        phi[f"conv{i}.weight"] = torch.nn.init.xavier_uniform_(w, generator=generator)
        phi[f"conv{i}.bias"] = torch.zeros(filters, **kw)
        phi[f"bn{i}.weight"] = torch.ones(filters, **kw)
        phi[f"bn{i}.bias"] = torch.zeros(filters, **kw)
    phi["head.weight"] = torch.nn.init.xavier_uniform_(torch.empty(head.shape, **kw), generator=generator)
    phi["head.bias"] = torch.zeros(head.shape[0], **kw)
    return {COLEARNER + name: p for name, p in phi.items()}


def inner_loop(net: dict[str, torch.Tensor], x_s: torch.Tensor, y_s: torch.Tensor, *, base: str, inner_steps: int,
               inner_lr: float, per_step_bn: bool, create_graph: bool, use_vmap: bool, recompute: bool = False):
    """The base method's inner loop without sharing: the Conv4 weights of the forward at θ_{t,j}, j = 0..K
    (each a dict of (tasks, ...) tensors; BN row j with MAML++ per-step BN); maml: only θ_{t,K}, as the list's last."""
    if base == "maml":
        theta, _, _ = maml_gs.split_params(net)
        fast, _ = maml_gs.inner_loop(theta, None, None, None, x_s, y_s, inner_steps=inner_steps, inner_lr=inner_lr,
                                     share=True, create_graph=create_graph, use_vmap=use_vmap, recompute=recompute)
        return [fast]
    theta, bn, lslr, _, _ = mamlpp_gs.split_params(net, inner_steps, inner_lr, per_step_bn)
    trajectory, _ = mamlpp_gs.inner_loop(theta, bn, lslr, None, None, None, x_s, y_s, inner_steps=inner_steps,
                                         share=True, create_graph=create_graph, use_vmap=use_vmap, recompute=recompute)
    return [mamlpp_gs.step_weights(fast, bn, j) for j, fast in enumerate(trajectory)]


def split_params(params: dict[str, torch.Tensor]):
    """params -> (the base method's meta-parameters, φ without its prefix)."""
    net = {name: p for name, p in params.items() if not name.startswith(COLEARNER)}
    return net, {name.removeprefix(COLEARNER): p for name, p in params.items() if name.startswith(COLEARNER)}


def meta_gradient(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, epoch: int, *, base: str,
                  gamma: float, inner_steps: int, inner_lr: float, per_step_bn: bool, first_order: bool,
                  msl_epochs: int, first_order_epochs: int, clip_grad: float, use_vmap: bool,
                  recompute: bool = False) -> common.StepResult:
    """One meta-iteration: the base's adaptation and query loss, plus γ · the co-learner's query loss."""
    net, phi = split_params(params)
    weights = mamlpp_gs.msl_weights(epoch, inner_steps, msl_epochs) if base == "mamlpp" else None
    steps = range(1, inner_steps + 1) if weights is not None else [inner_steps]
    create_graph = not first_order if base == "maml" else epoch >= first_order_epochs
    num_tasks = tasks.x_s.shape[0]
    # Tasks are independent: on the loop path one task at a time gives the same sums with 1/T of the memory.
    groups = [slice(None)] if use_vmap else [slice(t, t + 1) for t in range(num_tasks)]
    loss_meta, loss_co, correct = 0.0, 0.0, 0.0
    g_meta, g_co, g_phi = [None] * len(net), [None] * len(net), [None] * len(phi)
    for group in groups:
        weights_at = inner_loop(net, tasks.x_s[group], tasks.y_s[group], base=base, inner_steps=inner_steps,
                                inner_lr=inner_lr, per_step_bn=per_step_bn, create_graph=create_graph,
                                use_vmap=use_vmap, recompute=recompute)
        outputs, grad_outputs = [], []  # the base's query loss(es), as maml_gs / mamlpp_gs compute them
        for j, weight in zip(steps, weights or [1.0]):
            at_step = weights_at[j if base == "mamlpp" else -1]
            step_loss, step_acc, d_step = common.query_loss_grads(at_step, tasks.x_q[group], tasks.y_q[group],
                                                                  weight / num_tasks, use_vmap)
            outputs, grad_outputs = outputs + list(at_step.values()), grad_outputs + list(d_step.values())
            loss_meta = loss_meta + step_loss
        # (1/T) Σ_t L_t^co at θ_{t,K}: its gradient w.r.t. the adapted weights (as leaves) and φ, then through
        # the inner loop to θ. Same shapes as the base's: logits (tasks, ways*queries, ways).
        adapted = {name: w.detach().requires_grad_() for name, w in weights_at[-1].items()}
        co_logits = common.forward_tasks(lambda w, x: colearner_forward(phi, prepool_features(w, x)), adapted,
                                         tasks.x_q[group], use_vmap)
        co = F.cross_entropy(co_logits.flatten(0, 1), tasks.y_q[group].flatten(), reduction="sum") \
            / (tasks.y_q.shape[1] * num_tasks)
        d_co = torch.autograd.grad(co, list(adapted.values()) + list(phi.values()), allow_unused=True,
                                   materialize_grads=True)  # the adapted head is unused: zeros
        g_phi = add_grads(g_phi, d_co[len(adapted):])
        g_meta = add_grads(g_meta, torch.autograd.grad(outputs, list(net.values()), grad_outputs, allow_unused=True,
                                                 retain_graph=True))
        g_co = add_grads(g_co, torch.autograd.grad(list(weights_at[-1].values()), list(net.values()), d_co[:len(adapted)],
                                             allow_unused=True))
        loss_co, correct = loss_co + co.detach(), correct + step_acc.sum()  # accuracy: the meta-learner's, at θ_{t,K}
    # g = g_meta + γ g_co: with γ = 0 exactly the base's meta-gradient (x + 0 = x).
    grads = {name: None if gm is None else gm + gamma * gc if gc is not None else gm
             for name, gm, gc in zip(net, g_meta, g_co)}
    if clip_grad > 0:  # as mamlpp_gs: the network's tensors only, not the LSLR rates (nor φ)
        grads = {name: g.clamp(-clip_grad, clip_grad) if g is not None and not name.startswith(mamlpp_gs.LSLR) else g
                 for name, g in grads.items()}
    grads.update({COLEARNER + name: gamma * g for name, g in zip(phi, g_phi)})
    # Gradient agreement on the extractor (conv and BN tensors of θ), flattened: cosine and norm ratio.
    extractor = [i for i, name in enumerate(net) if name.startswith(EXTRACTOR)]
    flat_meta = torch.cat([g_meta[i].flatten() for i in extractor])
    flat_co = torch.cat([g_co[i].flatten() for i in extractor])
    step_stats = {"loss_meta": loss_meta, "loss_co": loss_co,
                  "grad_cos": F.cosine_similarity(flat_meta, flat_co, dim=0),
                  "grad_norm_ratio": flat_co.norm() / flat_meta.norm()}
    # Epoch means from sums kept per epoch, as lwdgh.py: only finite steps are kept by the loop.
    same_epoch = state["epoch"] == epoch
    sums = {name: (state["sums"][name] if same_epoch else 0) + value.detach() for name, value in step_stats.items()}
    new_state = {"epoch": epoch, "steps": (state["steps"] if same_epoch else 0) + 1, "sums": sums}
    return common.StepResult(loss_meta + gamma * loss_co, correct / num_tasks, grads, new_state)


def predict(params: dict[str, torch.Tensor], state: dict, tasks: common.Tasks, *, base_predict) -> torch.Tensor:
    """The base method's prediction with the meta-learner only: φ takes no part in evaluation."""
    net, _ = split_params(params)
    return base_predict(net, {"ghat": None}, tasks)


def scalars(params: dict[str, torch.Tensor], state: dict, *, base_scalars) -> dict[str, float]:
    """The base's own numbers (MAML++: mean LSLR rate) and the epoch means of STATS."""
    values = base_scalars(split_params(params)[0], {"ghat": None})
    if state["steps"] == 0:
        return {**values, **{name: math.nan for name in STATS}}
    return {**values, **{name: (state["sums"][name] / state["steps"]).item() for name in STATS}}


def make_algorithm(args: Args, image_shape: tuple[int, int, int], device: torch.device) -> common.Algorithm:
    """The base's meta-parameters and init (gradient sharing off), plus φ; no statistics before the first step."""
    base = BASES[args.base].make_algorithm(args.base_args(), image_shape, device)
    phi = colearner_init({name: p.detach().cpu() for name, p in base.params.items()},
                         torch.Generator().manual_seed(args.seed + COLEARNER_SEED_OFFSET))
    params = {**base.params, **{name: p.to(device).requires_grad_() for name, p in phi.items()}}
    state = {"epoch": -1, "steps": 0, "sums": {}}  # epoch −1: the first meta-iteration starts its epoch's sums
    return common.Algorithm(
        name=f"cml_{args.base}", params=params, state=state,
        meta_gradient=partial(meta_gradient, base=args.base, gamma=args.gamma, inner_steps=args.inner_steps,
                              inner_lr=args.inner_lr, per_step_bn=args.per_step_bn, first_order=args.first_order,
                              msl_epochs=args.msl_epochs, first_order_epochs=args.first_order_epochs,
                              clip_grad=args.clip_grad, use_vmap=common.use_vmap(args.vmap, device),
                              recompute=args.recompute),
        predict=partial(predict, base_predict=base.predict), scalars=partial(scalars, base_scalars=base.scalars),
        outer_lr=base.outer_lr)


if __name__ == "__main__":
    common.main(Args, make_algorithm, description=__doc__.splitlines()[0])

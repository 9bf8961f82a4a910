"""mamlpp_gs.py: meta-gradients against finite differences and an independent per-task loop; MSL schedule;
every MAML++ feature off is exactly MAML; CLI."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import common
import maml_gs
import mamlpp_gs

REPO = Path(__file__).resolve().parents[1]
DTYPE = torch.float64
SHAPE = (1, 8, 8)  # tiny images: 2 conv blocks take 8×8 to 2×2
WAYS, SHOTS, QUERIES, TASKS, FILTERS, BLOCKS = 3, 2, 2, 3, 4, 2
STEPS, LR = 2, 0.4  # a large α makes the second-order terms matter
MSL_EPOCHS = 15
# MSL weights of θ_1, θ_2 for K = 2 by hand: 1/2 each at epoch 0; at epoch 7 the first falls by 7·(1/2)/15
# and the last grows by (2−1)·7·(1/2)/15; from epoch 15 on only θ_2 counts (weights None).
MSL_AT = {0: [1 / 2, 1 / 2], 7: [1 / 2 - 7 / 30, 1 / 2 + 7 / 30], MSL_EPOCHS: None}
GS = ("m", "lambda")
# (gs, later): sharing on the first meta-iteration (no ĝ yet), sharing with a stored ĝ, no sharing
SHARING_CASES, SHARING_IDS = [(True, False), (True, True), (False, False)], ["gs-first", "gs-later", "no-gs"]
OFF = ["--no-lslr", "--no-per-step-bn", "--msl-epochs", "0", "--first-order-epochs", "0", "--no-cosine",
       "--clip-grad", "0"]
TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--filters", "8", "--tasks", "2",
        "--ways", "3", "--queries", "2", "--inner-steps", "2", "--epochs", "2", "--iters-per-epoch", "2",
        "--val-tasks", "4", "--test-tasks", "4", "--ensemble", "2", "--quiet"]


def tiny_params(seed: int = 0, gs: bool = True, per_step_bn: bool = True, lslr: bool = True,
                adapt_bn: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    theta = common.conv4_init(SHAPE, WAYS, FILTERS, BLOCKS, generator=gen, dtype=DTYPE)
    # Move every tensor off its initial value (BN scale 1, zero biases, rates = LR, identical BN rows) so that
    # no term vanishes by symmetry.
    params = {n: p + 0.2 * torch.randn(p.shape, generator=gen, dtype=DTYPE) for n, p in theta.items()}
    if per_step_bn:
        params.update({n: p + 0.2 * torch.randn(STEPS, *p.shape, generator=gen, dtype=DTYPE)
                       for n, p in theta.items() if n.startswith("bn")})
    if lslr:
        adapted = list(split(params, per_step_bn, adapt_bn)[0])
        params.update({mamlpp_gs.LSLR + n: LR + 0.1 * torch.randn(STEPS, generator=gen, dtype=DTYPE) for n in adapted})
    if gs:
        params["m"] = 0.5 * torch.randn(STEPS, generator=gen, dtype=DTYPE)
        params["lambda"] = 0.5 * torch.randn(STEPS, generator=gen, dtype=DTYPE)
    return {n: p.requires_grad_() for n, p in params.items()}


def split(params: dict, per_step_bn: bool = True, adapt_bn: bool = False):
    """(adapted tensors, BN tensors not adapted: per-step rows, or (C,) unless adapt_bn) of a parameter dict."""
    bn = {n: p for n, p in params.items() if n.startswith("bn") and (per_step_bn or not adapt_bn)}
    return {n: p for n, p in params.items() if n not in GS and not n.startswith("lslr.") and n not in bn}, bn


def tiny_tasks(seed: int = 1, tasks: int = TASKS) -> common.Tasks:
    gen = torch.Generator().manual_seed(seed)
    def labels(per_class):
        return torch.arange(WAYS).repeat_interleave(per_class).repeat(tasks, 1)
    return common.Tasks(torch.randn(tasks, WAYS * SHOTS, *SHAPE, generator=gen, dtype=DTYPE), labels(SHOTS),
                        torch.randn(tasks, WAYS * QUERIES, *SHAPE, generator=gen, dtype=DTYPE), labels(QUERIES))


def stored_ghat(params: dict, per_step_bn: bool = True, seed: int = 2, adapt_bn: bool = False) -> list[dict]:
    """A ĝ as a previous meta-iteration would have left it: one unit vector (over the adapted tensors) per step."""
    gen = torch.Generator().manual_seed(seed)
    ghat = []
    for _ in range(STEPS):
        g = {n: torch.randn(p.shape, generator=gen, dtype=DTYPE)
             for n, p in split(params, per_step_bn, adapt_bn)[0].items()}
        norm = math.sqrt(sum(float(v.square().sum()) for v in g.values()))
        ghat.append({n: v / norm for n, v in g.items()})
    return ghat


def tiny_args(use_vmap=False, module=mamlpp_gs, **kwargs):
    return module.Args(inner_steps=STEPS, inner_lr=LR, vmap="on" if use_vmap else "off", **kwargs)


def run_step(params, ghat, tasks, epoch=0, per_step_bn=True, first_order_epochs=0, clip_grad=0.0, use_vmap=False,
             recompute=False, adapt_bn=False):
    args = tiny_args(use_vmap, per_step_bn=per_step_bn, msl_epochs=MSL_EPOCHS, first_order_epochs=first_order_epochs,
                     clip_grad=clip_grad, recompute=recompute, lslr=any(n.startswith(mamlpp_gs.LSLR) for n in params),
                     adapt_bn=adapt_bn)
    return mamlpp_gs.meta_gradient(params, {"ghat": ghat}, tasks, epoch, args)


def reference_adapt(params, ghat, x_s, y_s, per_step_bn=True, first_order=False, meta_test=False, adapt_bn=False):
    """Algorithm 1 (or 2) with LSLR and per-step BN as the papers print them, independently: steps, then tasks,
    flat vectors over the adapted tensors. Returns net(t, j): task t's network at θ_{t,j}, j = 1..K, for the
    query after step j: BN row j − 1, the row of step j's support forward (the reference's num_step)."""
    theta, bn = split(params, per_step_bn, adapt_bn)
    names, shapes = list(theta), [p.shape for p in theta.values()]
    sizes = [math.prod(s) for s in shapes]
    m, lam = params.get("m"), params.get("lambda")

    def rates(k):  # the learning rate of every element of the adapted vector at step k
        return torch.cat([params[f"lslr.{n}"][k].expand(size) for n, size in zip(names, sizes)])

    def network(vector, j):  # adapted tensors from the vector, BN from row j (or BN as it is)
        return {**{n: v.view(s) for n, v, s in zip(names, torch.split(vector, sizes), shapes)},
                **{n: p[j] if per_step_bn else p for n, p in bn.items()}}

    weights = [[torch.cat([p.flatten() for p in theta.values()])] for _ in range(x_s.shape[0])]  # per task: θ_0..θ_k
    for k in range(STEPS):
        task_grads = []
        for t, trajectory in enumerate(weights):
            w = trajectory[-1]
            loss = F.cross_entropy(common.conv4_forward(network(w, k), x_s[t]), y_s[t])
            task_grads.append(torch.autograd.grad(loss, w, create_graph=not first_order)[0])
        shared = None
        if m is not None:
            old = torch.cat([ghat[k][n].flatten() for n in names]) if ghat is not None else None
            if meta_test:
                shared = old
            else:
                total = sum(task_grads)
                g_k = total / total.norm()
                shared = g_k if ghat is None else torch.sigmoid(m[k]) * g_k + (1 - torch.sigmoid(m[k])) * old
        for t, trajectory in enumerate(weights):
            delta = task_grads[t]
            if shared is not None:
                delta = torch.sigmoid(lam[k]) * shared + (1 - torch.sigmoid(lam[k])) * task_grads[t]
            trajectory.append(trajectory[-1] - rates(k) * delta)
    return lambda t, j: network(weights[t][j], j - 1)


def reference_loss(params, ghat, tasks, msl, per_step_bn=True, first_order=False, adapt_bn=False):
    """Σ_j w_j (1/T) Σ_t L_t^query(θ_{t,j}) with the hand-computed weights msl (None: the final step only)."""
    net = reference_adapt(params, ghat, tasks.x_s, tasks.y_s, per_step_bn, first_order, adapt_bn=adapt_bn)
    def query(j):
        return sum(F.cross_entropy(common.conv4_forward(net(t, j), tasks.x_q[t]), tasks.y_q[t])
                   for t in range(TASKS)) / TASKS
    if msl is None:
        return query(STEPS)
    return sum(w * query(j) for j, w in enumerate(msl, start=1))


def assert_grads_match(result, params, ref_loss):
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()), allow_unused=True)
    torch.testing.assert_close(result.loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
    for (name, got), want in zip(result.grads.items(), ref_grads):
        if want is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("gs, later", SHARING_CASES, ids=SHARING_IDS)
@pytest.mark.parametrize("per_step_bn, adapt_bn", [(True, False), (False, False), (False, True)],
                         ids=["per-step-bn", "one-bn", "adapted-bn"])
@pytest.mark.parametrize("epoch", sorted(MSL_AT), ids=[f"epoch{e}" for e in sorted(MSL_AT)])
def test_matches_independent_per_task_loop(gs, later, per_step_bn, adapt_bn, epoch):
    params, tasks = tiny_params(gs=gs, per_step_bn=per_step_bn, adapt_bn=adapt_bn), tiny_tasks()
    ghat = stored_ghat(params, per_step_bn, adapt_bn=adapt_bn) if (later and gs) else None
    result = run_step(params, ghat, tasks, epoch, per_step_bn, adapt_bn=adapt_bn)
    assert_grads_match(result, params, reference_loss(params, ghat, tasks, MSL_AT[epoch], per_step_bn,
                                                      adapt_bn=adapt_bn))


def test_accuracy_is_at_the_final_adapted_weights():
    params, tasks = tiny_params(), tiny_tasks(seed=8)  # tasks on which θ_1 and θ_K score differently
    ghat = stored_ghat(params)
    result = run_step(params, ghat, tasks, 0)  # MSL on: the queries are also evaluated at θ_1
    net = reference_adapt(params, ghat, tasks.x_s, tasks.y_s)
    for j, want in ((1, False), (STEPS, True)):
        logits = torch.stack([common.conv4_forward(net(t, j), tasks.x_q[t]) for t in range(TASKS)])
        assert (result.accuracy.item() == common.accuracy(logits, tasks.y_q).mean().item()) == want


@pytest.mark.parametrize("epoch", [2, 3], ids=["first-order-epoch", "second-order-epoch"])
@pytest.mark.parametrize("use_vmap", [False, True], ids=["loop", "vmap"])
def test_derivative_order_annealing_and_vmap(epoch, use_vmap):
    params, tasks = tiny_params(), tiny_tasks()
    ghat = stored_ghat(params)
    result = run_step(params, ghat, tasks, epoch, first_order_epochs=3, use_vmap=use_vmap)  # first order in epochs 0-2
    msl = [1 / 2 - epoch / 30, 1 / 2 + epoch / 30]
    assert_grads_match(result, params, reference_loss(params, ghat, tasks, msl, first_order=epoch < 3))


@pytest.mark.parametrize("gs", [True, False])
@pytest.mark.parametrize("use_vmap", [False, True], ids=["loop", "vmap"])
def test_recomputing_the_inner_steps_gives_the_same_meta_gradient(gs, use_vmap):
    params, tasks = tiny_params(gs=gs), tiny_tasks()
    ghat = stored_ghat(params) if gs else None
    stored = run_step(params, ghat, tasks, 7, use_vmap=use_vmap)
    recomputed = run_step(params, ghat, tasks, 7, use_vmap=use_vmap, recompute=True)
    torch.testing.assert_close(recomputed.loss, stored.loss, rtol=1e-14, atol=0)
    for name, g in stored.grads.items():
        torch.testing.assert_close(recomputed.grads[name], g, rtol=1e-12, atol=1e-15, msg=name)


@pytest.mark.parametrize("gs, later", SHARING_CASES, ids=SHARING_IDS)
def test_meta_gradient_matches_central_finite_differences(gs, later):
    params, tasks = tiny_params(gs=gs), tiny_tasks()
    ghat = stored_ghat(params) if (later and gs) else None
    epoch = 7  # MSL on: every BN row and every rate takes part
    grads = run_step(params, ghat, tasks, epoch).grads
    if gs and not later:
        assert grads["m"] is None  # ĝ = g on the first iteration: m takes no part (Eq. 2)
    # A small step: the inner loop's gradients jump where a ReLU or a max-pool switches, so the adapted loss
    # has tiny jumps that a larger step may straddle; float64 round-off at 1e-7 is still ~1e-9.
    gen, eps = torch.Generator().manual_seed(3), 1e-7

    def loss_at(name, direction):
        with torch.no_grad():
            shifted = {n: (p + direction if n == name else p).detach().requires_grad_() for n, p in params.items()}
        return float(run_step(shifted, ghat, tasks, epoch).loss)

    checked = set()
    for name, p in params.items():
        if grads[name] is None:
            continue
        # Every element of m, λ and of the LSLR rates; two random directions for each θ and BN tensor.
        directions = ([torch.zeros_like(p).view(-1).index_fill_(0, torch.tensor([i]), 1.0).view(p.shape)
                       for i in range(p.numel())] if name in GS or name.startswith(mamlpp_gs.LSLR) else
                      [torch.randn(p.shape, generator=gen, dtype=DTYPE) for _ in range(2)])
        for v in directions:
            numeric = (loss_at(name, eps * v) - loss_at(name, -eps * v)) / (2 * eps)
            analytic = float((grads[name] * v).sum())
            assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-8), name
        checked.add(name)
    assert checked == set(params) - ({"m"} if gs and not later else set())
    assert {"bn0.weight", "bn1.bias", "lslr.conv0.weight", "lslr.head.bias"} <= checked
    for name in ("bn0.weight", "bn0.bias"):  # every row, the query's (K) included, gets a gradient
        assert grads[name].shape == (STEPS, FILTERS) and bool(grads[name].abs().sum(1).gt(0).all()), name


def test_msl_weights_at_epochs_0_7_and_15_on():
    # K = 5, 15 MSL epochs: start 1/5, non-final decay (1/5)/15 per epoch, final growth 4·(1/5)/15 per epoch.
    assert MSL(0, 5, 15) == pytest.approx([0.2] * 5)
    assert MSL(7, 5, 15) == pytest.approx([8 / 75] * 4 + [43 / 75])  # 0.2 − 7/75, 0.2 + 28/75
    assert MSL(14, 5, 15) == pytest.approx([1 / 75] * 4 + [71 / 75])
    for epoch in (15, 16, 100):
        assert MSL(epoch, 5, 15) is None  # the final step only
    # The floor 0.03/K and the cap 1 − (K−1)·0.03/K bind late in a long schedule.
    assert MSL(99, 5, 100) == pytest.approx([0.006] * 4 + [0.976])
    assert MSL(0, 5, 0) is None  # --msl-epochs 0: MSL off
    assert MSL(0, 1, 15) == pytest.approx([1.0])


def MSL(epoch, inner_steps, msl_epochs):
    return mamlpp_gs.msl_weights(epoch, mamlpp_gs.Args(inner_steps=inner_steps, msl_epochs=msl_epochs))


def test_cosine_annealing_is_the_references_per_epoch_schedule():
    epochs, outer_lr, min_outer_lr = 10, 1e-3, 1e-5
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=outer_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=min_outer_lr)
    for epoch in range(epochs):
        want = optimizer.param_groups[0]["lr"]
        args = mamlpp_gs.Args(epochs=epochs, outer_lr=outer_lr, min_outer_lr=min_outer_lr)
        assert mamlpp_gs.cosine_lr(epoch, args) == pytest.approx(want)
        optimizer.step()
        scheduler.step()
    args = common.parse_args(mamlpp_gs.Args, ["--epochs", "10", "--outer-lr", "0.002", "--min-outer-lr", "0.0001"])
    assert mamlpp_gs.cosine_lr(0, args) == 0.002 and mamlpp_gs.cosine_lr(5, args) == pytest.approx(0.00105)


def test_clip_grad_clamps_the_network_meta_gradients_only():
    params, tasks = tiny_params(), tiny_tasks()
    ghat, clip = stored_ghat(params), 1e-3
    free, clamped = run_step(params, ghat, tasks, 7).grads, run_step(params, ghat, tasks, 7, clip_grad=clip).grads
    network = set().union(*split(params))
    for name in params:
        want = free[name].clamp(-clip, clip) if name in network else free[name]
        assert torch.equal(clamped[name], want), name
    assert all(bool(free[n].abs().gt(clip).any())
               for n in ("conv0.weight", "bn0.weight", "lslr.conv0.weight", "lambda"))


@pytest.mark.parametrize("gs, later", SHARING_CASES, ids=SHARING_IDS)
def test_every_feature_off_is_exactly_maml(gs, later):
    params, tasks = tiny_params(gs=gs, per_step_bn=False, lslr=False), tiny_tasks()
    ghat = stored_ghat(params, per_step_bn=False) if (later and gs) else None
    ours = tiny_args(per_step_bn=False, lslr=False, msl_epochs=0, first_order_epochs=0, clip_grad=0.0, cosine=False)
    for epoch in (0, 20):
        got = mamlpp_gs.meta_gradient(params, {"ghat": ghat}, tasks, epoch, ours)
        want = maml_gs.meta_gradient(params, {"ghat": ghat}, tasks, epoch, tiny_args(module=maml_gs))
        assert torch.equal(got.loss, want.loss)
        for name in params:
            assert (got.grads[name] is None and want.grads[name] is None) or torch.equal(got.grads[name],
                                                                                         want.grads[name]), name
    assert torch.equal(mamlpp_gs.predict(params, {"ghat": ghat}, tasks, ours),
                       maml_gs.predict(params, {"ghat": ghat}, tasks, tiny_args(module=maml_gs)))


def image_tasks(size: int = 28) -> common.Tasks:
    """tiny_tasks as float32 images of size×size, what a real run feeds the file's functions."""
    tasks = tiny_tasks()
    x_s, x_q = (F.interpolate(x.flatten(0, 1).float(), size=size).view(TASKS, -1, 1, size, size)
                for x in (tasks.x_s, tasks.x_q))
    return tasks._replace(x_s=x_s, x_q=x_q)


def build(module, args) -> tuple[dict, dict]:
    """(params, state) as the file's main makes them, for 28×28 one-channel images on the CPU."""
    return module.init_params(args, (1, 28, 28), torch.device("cpu")), module.init_state(args)


def floats(metrics: dict) -> dict:
    return {name: float(value) for name, value in metrics.items()}


@pytest.mark.parametrize("gs", ["--gs", "--no-gs"])
def test_every_flag_off_is_the_maml_configuration(gs):
    argv = ["--ways", str(WAYS), "--filters", str(FILTERS), gs]
    args_ours, args_maml = common.parse_args(mamlpp_gs.Args, argv + OFF), common.parse_args(maml_gs.Args, argv)
    (ours, state_ours), (maml, state_maml) = build(mamlpp_gs, args_ours), build(maml_gs, args_maml)
    assert list(ours) == list(maml) and not args_ours.cosine
    assert all(torch.equal(ours[n], maml[n]) for n in maml)
    tasks = image_tasks()
    for epoch in range(2):  # the first iteration stores ĝ; the second uses it
        got = mamlpp_gs.meta_gradient(ours, state_ours, tasks, epoch, args_ours)
        want = maml_gs.meta_gradient(maml, state_maml, tasks, epoch, args_maml)
        assert torch.equal(got.loss, want.loss)
        assert all((want.grads[n] is None and got.grads[n] is None) or torch.equal(got.grads[n], want.grads[n])
                   for n in maml)
        assert floats(got.metrics) == floats(want.metrics)
        state_ours, state_maml = got.state, want.state
    assert torch.equal(mamlpp_gs.predict(ours, state_ours, tasks, args_ours),
                       maml_gs.predict(maml, state_maml, tasks, args_maml))


def test_init_params_builds_per_step_bn_and_lslr():
    args = mamlpp_gs.Args(ways=WAYS, filters=FILTERS, inner_lr=0.25, inner_steps=3)
    params, state = build(mamlpp_gs, args)
    adapted = [f"conv{i}.{k}" for i in range(4) for k in ("weight", "bias")] + ["head.weight", "head.bias"]
    bn = [f"bn{i}.{k}" for i in range(4) for k in ("weight", "bias")]
    assert set(params) == set(adapted) | set(bn) | {mamlpp_gs.LSLR + n for n in adapted} | set(GS)
    assert all(params[n].shape == (3, FILTERS) for n in bn)  # K rows
    assert bool((params["bn2.weight"] == 1).all()) and bool((params["bn2.bias"] == 0).all())
    assert all(params[mamlpp_gs.LSLR + n].tolist() == [0.25] * 3 for n in adapted)
    result = mamlpp_gs.meta_gradient(params, state, image_tasks(), 0, args)
    assert floats(result.metrics) == {"sigma_m": 0.5, "sigma_lambda": 0.5, "lslr_mean": pytest.approx(0.25)}
    with torch.no_grad():
        params["lslr.head.bias"][2] += 1.3  # one rate of 10 tensors × 3 steps
    assert float(mamlpp_gs.meta_gradient(params, state, image_tasks(), 0, args).metrics["lslr_mean"]) == \
        pytest.approx(0.25 + 1.3 / 30)
    ghat = result.state["ghat"]
    assert len(ghat) == 3 and all(set(ghat_k) == set(adapted) for ghat_k in ghat)  # ĝ spans the adapted tensors only
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in ghat[0].values()))
    assert norm == pytest.approx(1.0, rel=1e-5)


def test_predict_adapts_with_lslr_per_step_bn_and_the_stored_ghat_and_never_changes_it():
    params, tasks = tiny_params(), tiny_tasks(seed=5)
    state = {"ghat": stored_ghat(params)}
    before = [{n: v.clone() for n, v in ghat_k.items()} for ghat_k in state["ghat"]]
    logits = mamlpp_gs.predict(params, state, tasks, tiny_args())
    net = reference_adapt(params, state["ghat"], tasks.x_s, tasks.y_s, first_order=True, meta_test=True)
    want = torch.stack([common.conv4_forward(net(t, STEPS), tasks.x_q[t]) for t in range(TASKS)])
    torch.testing.assert_close(logits, want.detach(), rtol=1e-10, atol=1e-12)
    for old, new in zip(before, state["ghat"]):
        assert all(torch.equal(old[n], new[n]) for n in old)
    torch.testing.assert_close(mamlpp_gs.predict(params, state, tasks, tiny_args(use_vmap=True)), logits,
                               rtol=1e-12, atol=1e-12)


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("flags", [["--gs"], ["--no-gs", "--msl-epochs", "1", "--first-order-epochs", "1",
                                              "--clip-grad", "10"], ["--gs"] + OFF], ids=["gs", "no-gs", "all-off"])
def test_synthetic_run(tmp_path, flags):
    result = mamlpp_gs.main(TINY + flags + ["--out", str(tmp_path / "run")])
    assert result["status"] == "finished" and result["epochs_run"] == 2 and 0 <= result["test_acc_ensemble"] <= 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["program"] == "mamlpp_gs" and config["algorithm"] == ("mamlpp_gs" if "--gs" in flags else "mamlpp")
    rows = metrics(tmp_path / "run")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert ("sigma_m" in rows[0]) == ("--gs" in flags) and ("lslr_mean" in rows[0]) == ("--no-lslr" not in flags)
    # The loop set the outer lr of the last epoch from the cosine schedule (or left --outer-lr without it).
    lr = common.load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]["param_groups"][0]["lr"]
    assert lr == (1e-3 if "--no-cosine" in flags else pytest.approx(mamlpp_gs.cosine_lr(1, mamlpp_gs.Args(epochs=2))))


def test_omniglot_small(tmp_path, shared_data):
    result = mamlpp_gs.main([
        "--dataset", "omniglot", "--data-root", str(shared_data), "--cache-dir", str(tmp_path / "cache"),
        "--filters", "8", "--tasks", "2", "--inner-steps", "1", "--epochs", "2", "--iters-per-epoch", "2",
        "--val-tasks", "5", "--test-tasks", "5", "--quiet", "--out", str(tmp_path / "run")])
    assert result["status"] == "finished" and result["epochs_run"] == 2 and len(result["ensemble_epochs"]) == 2


def test_help_lists_every_flag_and_bad_values_are_refused():
    out = subprocess.run([sys.executable, str(REPO / "mamlpp_gs.py"), "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0
    for field in mamlpp_gs.Args.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in out.stdout
    for bad in (["--msl-epochs", "-1"], ["--first-order-epochs", "-2"], ["--clip-grad", "-1"], ["--min-outer-lr", "1"]):
        with pytest.raises(SystemExit):
            common.parse_args(mamlpp_gs.Args, bad)

"""metasgd_gs.py: meta-gradients against finite differences and an independent per-task loop; MAML equivalence; CLI."""
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
import metasgd_gs

REPO = Path(__file__).resolve().parents[1]
DTYPE = torch.float64
SHAPE = (1, 8, 8)  # tiny images: 2 conv blocks take 8×8 to 2×2
WAYS, SHOTS, QUERIES, TASKS, FILTERS, BLOCKS = 3, 2, 2, 3, 4, 2
STEPS, LR = 2, 0.4  # a large α makes the second-order terms matter
GS = ("m", "lambda")
# (gs, later): sharing on the first meta-iteration (no ĝ yet), sharing with a stored ĝ, no sharing
SHARING_CASES, SHARING_IDS = [(True, False), (True, True), (False, False)], ["gs-first", "gs-later", "no-gs"]
TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--filters", "8", "--tasks", "2",
        "--ways", "3", "--queries", "2", "--inner-steps", "2", "--epochs", "2", "--iters-per-epoch", "2",
        "--val-tasks", "4", "--test-tasks", "4", "--ensemble", "2", "--quiet"]


def tiny_params(seed: int = 0, gs: bool = True, learn_alpha: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    theta = common.conv4_init(SHAPE, WAYS, FILTERS, BLOCKS, generator=gen, dtype=DTYPE)
    # Move every tensor off its initial value (BN scale 1, zero biases, α = LR) so that no term vanishes by symmetry.
    params = {n: p + 0.2 * torch.randn(p.shape, generator=gen, dtype=DTYPE) for n, p in theta.items()}
    if learn_alpha:
        params.update({metasgd_gs.ALPHA + n: LR + 0.1 * torch.randn(p.shape, generator=gen, dtype=DTYPE)
                       for n, p in theta.items() if not n.startswith("bn")})  # α of the adapted tensors
    if gs:
        params["m"] = 0.5 * torch.randn(STEPS, generator=gen, dtype=DTYPE)
        params["lambda"] = 0.5 * torch.randn(STEPS, generator=gen, dtype=DTYPE)
    return {n: p.requires_grad_() for n, p in params.items()}


def network(params: dict) -> dict[str, torch.Tensor]:
    return {n: p for n, p in params.items() if n not in GS and not n.startswith(metasgd_gs.ALPHA)}


def adapted(params: dict) -> dict[str, torch.Tensor]:
    """What the inner loop adapts by default: θ but BatchNorm's scale and shift."""
    return {n: p for n, p in network(params).items() if not n.startswith("bn")}


def tiny_tasks(seed: int = 1, tasks: int = TASKS) -> common.Tasks:
    gen = torch.Generator().manual_seed(seed)
    def labels(per_class):
        return torch.arange(WAYS).repeat_interleave(per_class).repeat(tasks, 1)
    return common.Tasks(torch.randn(tasks, WAYS * SHOTS, *SHAPE, generator=gen, dtype=DTYPE), labels(SHOTS),
                        torch.randn(tasks, WAYS * QUERIES, *SHAPE, generator=gen, dtype=DTYPE), labels(QUERIES))


def stored_ghat(params: dict, seed: int = 2) -> list[dict[str, torch.Tensor]]:
    """A ĝ as a previous meta-iteration would have left it: one unit vector (over all of θ) per step."""
    gen = torch.Generator().manual_seed(seed)
    ghat = []
    for _ in range(STEPS):
        g = {n: torch.randn(p.shape, generator=gen, dtype=DTYPE) for n, p in adapted(params).items()}
        norm = math.sqrt(sum(float(v.square().sum()) for v in g.values()))
        ghat.append({n: v / norm for n, v in g.items()})
    return ghat


def tiny_args(use_vmap=False, module=metasgd_gs, **kwargs):
    return module.Args(inner_steps=STEPS, inner_lr=LR, vmap="on" if use_vmap else "off", **kwargs)


def run_step(params, ghat, tasks, first_order=False, use_vmap=False, recompute=False):
    args = tiny_args(use_vmap, first_order=first_order, recompute=recompute)
    return metasgd_gs.meta_gradient(params, {"ghat": ghat}, tasks, 0, args)


def reference_adapt(params, ghat, x_s, y_s, first_order=False, meta_test=False):
    """Algorithm 1 (or 2) for Meta-SGD as the papers print it, independently: steps, then tasks, flat vectors.

    Returns the adapted network of every task as a dict of tensors of θ's shapes."""
    theta, fixed = adapted(params), {n: p for n, p in network(params).items() if n.startswith("bn")}
    names, shapes = list(theta), [p.shape for p in theta.values()]
    alpha = torch.cat([params[metasgd_gs.ALPHA + n].flatten() for n in names])  # one rate per element of θ
    m, lam = params.get("m"), params.get("lambda")

    def net(vector):
        return {**fixed, **{n: v.view(s) for n, v, s in zip(names, torch.split(vector, [math.prod(s) for s in shapes]),
                                                           shapes)}}

    weights = [torch.cat([p.flatten() for p in theta.values()]) for _ in range(x_s.shape[0])]
    for k in range(STEPS):
        task_grads = []
        for t, w in enumerate(weights):
            loss = F.cross_entropy(common.conv4_forward(net(w), x_s[t]), y_s[t])
            task_grads.append(torch.autograd.grad(loss, w, create_graph=not first_order)[0])
        if m is not None:
            old = torch.cat([ghat[k][n].flatten() for n in names]) if ghat is not None else None
            if meta_test:
                shared = old
            else:
                total = sum(task_grads)
                g_k = total / total.norm()
                shared = g_k if ghat is None else torch.sigmoid(m[k]) * g_k + (1 - torch.sigmoid(m[k])) * old
        for t in range(len(weights)):
            delta = task_grads[t]
            if m is not None and shared is not None:
                delta = torch.sigmoid(lam[k]) * shared + (1 - torch.sigmoid(lam[k])) * task_grads[t]
            weights[t] = weights[t] - alpha * delta
    return [net(w) for w in weights]


def reference_loss(params, ghat, tasks, first_order=False):
    adapted = reference_adapt(params, ghat, tasks.x_s, tasks.y_s, first_order)
    losses = [F.cross_entropy(common.conv4_forward(net, tasks.x_q[t]), tasks.y_q[t]) for t, net in enumerate(adapted)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("gs, later", SHARING_CASES, ids=SHARING_IDS)
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("use_vmap", [False, True], ids=["loop", "vmap"])
def test_matches_independent_per_task_loop(gs, later, first_order, use_vmap):
    params, tasks = tiny_params(gs=gs), tiny_tasks()
    ghat = stored_ghat(params) if (later and gs) else None
    result = run_step(params, ghat, tasks, first_order, use_vmap)
    ref_loss = reference_loss(params, ghat, tasks, first_order)
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()), allow_unused=True)
    torch.testing.assert_close(result.loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
    for (name, got), want in zip(result.grads.items(), ref_grads):
        if want is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("gs", [True, False])
@pytest.mark.parametrize("use_vmap", [False, True], ids=["loop", "vmap"])
def test_recomputing_the_inner_steps_gives_the_same_meta_gradient(gs, use_vmap):
    params, tasks = tiny_params(gs=gs), tiny_tasks()
    ghat = stored_ghat(params) if gs else None
    stored = run_step(params, ghat, tasks, use_vmap=use_vmap)
    recomputed = run_step(params, ghat, tasks, use_vmap=use_vmap, recompute=True)
    torch.testing.assert_close(recomputed.loss, stored.loss, rtol=1e-14, atol=0)
    for name, g in stored.grads.items():
        torch.testing.assert_close(recomputed.grads[name], g, rtol=1e-12, atol=1e-15, msg=name)


@pytest.mark.parametrize("gs, later", SHARING_CASES, ids=SHARING_IDS)
def test_meta_gradient_matches_central_finite_differences(gs, later):
    params, tasks = tiny_params(gs=gs), tiny_tasks()
    ghat = stored_ghat(params) if (later and gs) else None
    grads = run_step(params, ghat, tasks).grads
    if gs and not later:
        assert grads["m"] is None  # ĝ = g on the first iteration: m takes no part (Eq. 2)
    # A small step: the inner loop's gradients jump where a ReLU or a max-pool switches, so the adapted loss
    # has tiny jumps that a larger step may straddle; float64 round-off at 1e-7 is still ~1e-9.
    gen, eps = torch.Generator().manual_seed(3), 1e-7

    def loss_at(name, direction):
        with torch.no_grad():
            shifted = {n: (p + direction if n == name else p).detach().requires_grad_() for n, p in params.items()}
        return float(run_step(shifted, ghat, tasks).loss)

    checked = set()
    for name, p in params.items():
        if grads[name] is None:
            continue
        # Every element of m and λ; two random directions for each θ tensor and each α tensor.
        directions = ([torch.zeros_like(p).view(-1).index_fill_(0, torch.tensor([i]), 1.0).view(p.shape)
                       for i in range(p.numel())] if name in GS else
                      [torch.randn(p.shape, generator=gen, dtype=DTYPE) for _ in range(2)])
        for v in directions:
            numeric = (loss_at(name, eps * v) - loss_at(name, -eps * v)) / (2 * eps)
            analytic = float((grads[name] * v).sum())
            assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-8), name
        checked.add(name)
    assert checked == set(params) - ({"m"} if gs and not later else set())
    assert any(n.startswith(metasgd_gs.ALPHA) for n in checked)


@pytest.mark.parametrize("gs, later", SHARING_CASES, ids=SHARING_IDS)
def test_alpha_fixed_at_the_inner_lr_is_exactly_maml(gs, later):
    # A learned α that happens to equal the inner lr everywhere: the same θ-gradients and loss, bit for bit.
    params, tasks = tiny_params(gs=gs), tiny_tasks()
    with torch.no_grad():
        for name, p in params.items():
            if name.startswith(metasgd_gs.ALPHA):
                p.fill_(LR)
    maml = {n: p for n, p in params.items() if not n.startswith(metasgd_gs.ALPHA)}
    ghat = stored_ghat(params) if (later and gs) else None
    got = run_step(params, ghat, tasks)
    want = maml_gs.meta_gradient(maml, {"ghat": ghat}, tasks, 0, tiny_args(module=maml_gs))
    assert torch.equal(got.loss, want.loss)
    for name in maml:
        assert (got.grads[name] is None and want.grads[name] is None) or torch.equal(got.grads[name],
                                                                                     want.grads[name]), name


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
def test_no_learn_alpha_is_exactly_maml(gs):
    argv = ["--ways", str(WAYS), "--filters", str(FILTERS), gs]
    args_ours, args_maml = common.parse_args(metasgd_gs.Args, argv + ["--no-learn-alpha"]), common.parse_args(
        maml_gs.Args, argv)
    (ours, state_ours), (maml, state_maml) = build(metasgd_gs, args_ours), build(maml_gs, args_maml)
    assert list(ours) == list(maml)
    assert all(torch.equal(ours[n], maml[n]) for n in maml)
    tasks = image_tasks()
    for epoch in range(2):  # the first iteration stores ĝ; the second uses it
        got = metasgd_gs.meta_gradient(ours, state_ours, tasks, epoch, args_ours)
        want = maml_gs.meta_gradient(maml, state_maml, tasks, epoch, args_maml)
        assert torch.equal(got.loss, want.loss)
        assert all((want.grads[n] is None and got.grads[n] is None) or torch.equal(got.grads[n], want.grads[n])
                   for n in maml)
        assert floats(got.metrics) == floats(want.metrics)
        assert set(got.metrics) == ({"sigma_m", "sigma_lambda"} if gs == "--gs" else set())
        state_ours, state_maml = got.state, want.state
    assert torch.equal(metasgd_gs.predict(ours, state_ours, tasks, args_ours),
                       maml_gs.predict(maml, state_maml, tasks, args_maml))


def test_init_params_sets_alpha_to_the_inner_lr():
    args = metasgd_gs.Args(ways=WAYS, filters=FILTERS, inner_lr=0.25, inner_steps=3)
    params, state = build(metasgd_gs, args)
    theta = adapted(params)  # α for the tensors the inner loop adapts: not BatchNorm's, by default
    assert set(params) == set(network(params)) | {metasgd_gs.ALPHA + n for n in theta} | set(GS)
    with_bn, _ = build(metasgd_gs, metasgd_gs.Args(ways=WAYS, filters=FILTERS, adapt_bn=True))
    assert {n for n in with_bn if n.startswith(metasgd_gs.ALPHA)} == {
        metasgd_gs.ALPHA + n for n in network(with_bn)}
    for name, p in theta.items():
        alpha = params[metasgd_gs.ALPHA + name]
        assert alpha.shape == p.shape and bool((alpha == 0.25).all()) and alpha.requires_grad
    assert params["m"].shape == (3,)
    tasks = image_tasks()
    values = floats(metasgd_gs.meta_gradient(params, state, tasks, 0, args).metrics)
    assert values == {"sigma_m": 0.5, "sigma_lambda": 0.5, "alpha_mean": pytest.approx(0.25), "alpha_std": 0.0}
    with torch.no_grad():
        params["alpha.head.bias"].add_(1.0)
    values = floats(metasgd_gs.meta_gradient(params, state, tasks, 0, args).metrics)
    every = torch.cat([params[metasgd_gs.ALPHA + n].flatten() for n in theta])
    assert values["alpha_mean"] == pytest.approx(every.mean().item())
    assert values["alpha_std"] == pytest.approx(every.std().item())


def test_predict_adapts_with_alpha_and_the_stored_ghat_and_never_changes_it():
    params, tasks = tiny_params(), tiny_tasks(seed=5)
    state = {"ghat": stored_ghat(params)}
    before = [{n: v.clone() for n, v in ghat_k.items()} for ghat_k in state["ghat"]]
    logits = metasgd_gs.predict(params, state, tasks, tiny_args())
    adapted = reference_adapt(params, state["ghat"], tasks.x_s, tasks.y_s, first_order=True, meta_test=True)
    want = torch.stack([common.conv4_forward(net, tasks.x_q[t]) for t, net in enumerate(adapted)])
    torch.testing.assert_close(logits, want.detach(), rtol=1e-10, atol=1e-12)
    for old, new in zip(before, state["ghat"]):
        assert all(torch.equal(old[n], new[n]) for n in old)
    torch.testing.assert_close(metasgd_gs.predict(params, state, tasks, tiny_args(use_vmap=True)), logits,
                               rtol=1e-12, atol=1e-12)


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("flags", [["--gs"], ["--no-gs"], ["--gs", "--no-learn-alpha"]], ids=" ".join)
def test_synthetic_run(tmp_path, flags):
    result = metasgd_gs.main(TINY + flags + ["--out", str(tmp_path / "run")])
    assert result["status"] == "finished" and result["epochs_run"] == 2 and 0 <= result["test_acc_ensemble"] <= 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["program"] == "metasgd_gs" and config["algorithm"] == ("metasgd_gs" if "--gs" in flags else "metasgd")
    rows = metrics(tmp_path / "run")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert ("sigma_m" in rows[0]) == ("--gs" in flags)
    assert ("alpha_mean" in rows[0] and "alpha_std" in rows[0]) == ("--no-learn-alpha" not in flags)


def test_omniglot_small(tmp_path, shared_data):
    result = metasgd_gs.main([
        "--dataset", "omniglot", "--data-root", str(shared_data), "--cache-dir", str(tmp_path / "cache"),
        "--filters", "8", "--tasks", "2", "--inner-steps", "1", "--epochs", "2", "--iters-per-epoch", "2",
        "--val-tasks", "5", "--test-tasks", "5", "--quiet", "--out", str(tmp_path / "run")])
    assert result["status"] == "finished" and result["epochs_run"] == 2 and len(result["ensemble_epochs"]) == 2


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, str(REPO / "metasgd_gs.py"), "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0
    for field in metasgd_gs.Args.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in out.stdout

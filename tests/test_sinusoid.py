"""--dataset sinusoid (regression): the task family, the MLP, the squared error through every file that runs it:
finite differences for every meta-parameter, MAML against an independent plain loop, the fixed evaluation tasks,
the ensemble of predictions, MSE in the run's files, bad values."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cml
import common
import lwdgh
import maml_gs
import metasgd_gs

REPO = Path(__file__).resolve().parents[1]
DTYPE = torch.float64
HIDDEN, SHOTS, QUERIES, TASKS = (5, 4), 4, 3, 3  # a tiny 1-5-4-1 MLP
STEPS, LR = 2, 0.3  # a large α makes the second-order terms matter
RUN = ["--dataset", "sinusoid", "--shots", "5", "--queries", "5", "--tasks", "2", "--epochs", "3",
       "--iters-per-epoch", "4", "--val-tasks", "6", "--test-tasks", "6", "--eval-batch", "4", "--inner-steps", "1",
       "--inner-lr", "0.01", "--ensemble", "2", "--quiet"]


def tiny_params(seed: int = 0, colearner_blocks: int | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = common.mlp_init(1, 1, HIDDEN, generator=gen, dtype=DTYPE)
    if colearner_blocks is not None:
        params.update(cml.colearner_init(params, gen, colearner_blocks))
    # Off the initial values (weights of 0.01, zero biases): every ReLU path and second-order term matters.
    return {n: (p + 0.5 * torch.randn(p.shape, generator=gen, dtype=DTYPE)).requires_grad_() for n, p in params.items()}


def tiny_tasks(seed: int = 1) -> common.Tasks:
    tasks = common.sinusoid_tasks(TASKS, SHOTS, QUERIES, torch.Generator().manual_seed(seed))
    return common.Tasks(*(t.to(DTYPE) for t in tasks))


def args_for(module, **kwargs):
    return module.Args(**{"dataset": "sinusoid", "backbone": "mlp", "ways": 1, "inner_steps": STEPS, "inner_lr": LR,
                          "vmap": "off", **kwargs})


def with_gs(params: dict, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {**params, **{name: (0.5 * torch.randn(STEPS, generator=gen, dtype=DTYPE)).requires_grad_()
                         for name in ("m", "lambda")}}


def later_state(module, params: dict, tasks: common.Tasks, args) -> dict:
    """The state a first meta-iteration leaves (a stored ĝ), from other weights."""
    other = {n: (p.detach() + 0.1).requires_grad_() for n, p in params.items()}
    return {"ghat": module.meta_gradient(other, {"ghat": None}, tasks, 0, args).state["ghat"]}


def check_finite_differences(step, params: dict, eps: float = 1e-6) -> int:
    """step(params) -> (loss, grads): every meta-gradient along a random direction per tensor (every element of
    the (K,) tensors) against central differences of the loss."""
    loss, grads = step(params)
    gen, checked = torch.Generator().manual_seed(3), 0
    for name, p in params.items():
        if grads.get(name) is None:
            continue
        directions = (torch.eye(p.numel(), dtype=DTYPE) if p.dim() == 1 and p.numel() == STEPS
                      else [torch.randn(p.shape, generator=gen, dtype=DTYPE)])
        for v in directions:
            def loss_at(delta):
                shifted = {n: (q + delta if n == name else q).detach().requires_grad_() for n, q in params.items()}
                return float(step(shifted)[0])
            numeric = (loss_at(eps * v) - loss_at(-eps * v)) / (2 * eps)
            assert float((grads[name] * v).sum()) == pytest.approx(numeric, rel=1e-5, abs=1e-8), name
            checked += 1
    return checked


# ---- the task family ----
def test_tasks_follow_finn_et_al_ranges_and_are_each_one_sinusoid():
    """A, φ recovered from each task's points by least squares: y = A cos φ sin x − A sin φ cos x."""
    count, points = 4000, 6
    tasks = common.sinusoid_tasks(count, points, points, torch.Generator().manual_seed(0))
    x, y = torch.cat([tasks.x_s, tasks.x_q], 1).double(), torch.cat([tasks.y_s, tasks.y_q], 1).double()
    assert tasks.x_s.shape == (count, points, 1) and tasks.y_q.shape == (count, points, 1)
    assert tasks.x_s.dtype == torch.float32
    assert x.min() >= -5 and x.max() <= 5 and abs(float(x.mean())) < 0.05 and float(x.var()) == pytest.approx(
        100 / 12, rel=0.02)  # U[-5, 5]
    design = torch.cat([torch.sin(x), -torch.cos(x)], -1)  # (tasks, points, 2)
    solution = torch.linalg.lstsq(design, y).solution.squeeze(-1)  # (tasks, 2): A cos φ, A sin φ
    amplitude, phase = solution.norm(dim=1), torch.atan2(solution[:, 1], solution[:, 0])
    torch.testing.assert_close(torch.einsum("tpk,tk->tp", design, solution), y.squeeze(-1), rtol=0, atol=1e-5)
    assert amplitude.min() >= 0.1 - 1e-4 and amplitude.max() <= 5 + 1e-4
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4
    assert float(amplitude.mean()) == pytest.approx(2.55, abs=0.06) and float(phase.mean()) == pytest.approx(
        math.pi / 2, abs=0.05)  # uniform: the middle of each range


def test_fixed_evaluation_tasks_are_the_same_in_every_run_batching_and_differ_between_val_and_test():
    def fixed(split, batch, queries=QUERIES):
        tasks = common.SinusoidEvalTasks(split, SHOTS, queries, 10, seed=0, device="cpu")
        return [torch.cat(part) for part in zip(*tasks.batches(batch))]
    val, test = fixed("val", 3), fixed("test", 10)
    for a, b in zip(val, fixed("val", 10)):
        assert torch.equal(a, b)
    assert not torch.equal(val[0], test[0])
    assert not torch.equal(val[0], common.SinusoidEvalTasks("val", SHOTS, QUERIES, 10, 1, "cpu").tasks.x_s)


def test_training_sampler_continues_exactly_from_its_state():
    sampler = common.SinusoidSampler(SHOTS, QUERIES, TASKS, seed=4, device="cpu")
    sampler.sample()
    state, want = sampler.state_dict(), sampler.sample()
    other = common.SinusoidSampler(SHOTS, QUERIES, TASKS, seed=4, device="cpu")
    assert other.load_state_dict(state) is None
    assert all(torch.equal(a, b) for a, b in zip(other.sample(), want))


# ---- the network and its loss ----
def plain_maml_loss(params: dict, tasks: common.Tasks) -> torch.Tensor:
    """MAML on the MLP as Finn et al. write it, task by task: K steps of SGD on the support MSE, then query MSE."""
    losses = []
    for t in range(TASKS):
        fast = dict(params)
        for _ in range(STEPS):
            loss = ((common.mlp_forward(fast, tasks.x_s[t]) - tasks.y_s[t]) ** 2).mean()
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: w - LR * g for (n, w), g in zip(fast.items(), grads)}
        losses.append(((common.mlp_forward(fast, tasks.x_q[t]) - tasks.y_q[t]) ** 2).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("use_vmap", [False, True], ids=["loop", "vmap"])
def test_maml_on_the_sinusoid_matches_a_plain_per_task_loop(use_vmap):
    params, tasks = tiny_params(), tiny_tasks()
    args = args_for(maml_gs, gs=False, vmap="on" if use_vmap else "off")
    result = maml_gs.meta_gradient(params, {"ghat": None}, tasks, 0, args)
    want = plain_maml_loss(params, tasks)
    torch.testing.assert_close(result.loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.accuracy, want.detach(), rtol=1e-12, atol=1e-12)  # the logged score: MSE
    for (name, got), expected in zip(result.grads.items(), torch.autograd.grad(want, list(params.values()))):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12, msg=name)


def test_the_mlp_is_finn_et_al_s_network():
    params = common.mlp_init(1, 1, generator=torch.Generator().manual_seed(0))
    assert {n: tuple(p.shape) for n, p in params.items()} == {
        "fc0.weight": (40, 1), "fc0.bias": (40,), "fc1.weight": (40, 40), "fc1.bias": (40,), "head.weight": (1, 40),
        "head.bias": (1,)}
    weights = torch.cat([p.flatten() for n, p in params.items() if n.endswith("weight")])
    assert weights.abs().max() <= 2 * common.MLP_INIT_STD and float(weights.std()) == pytest.approx(0.0088, rel=0.1)
    assert all(not p.any() for n, p in params.items() if n.endswith("bias"))
    x = torch.linspace(-5, 5, 7).unsqueeze(-1)
    assert common.mlp_forward(params, x).shape == (7, 1)


# ---- finite differences for every meta-parameter ----
@pytest.mark.parametrize("source", ["none", "both", "batch", "history"])
def test_maml_gs_meta_gradient_matches_finite_differences(source):
    tasks, gs = tiny_tasks(), source != "none"
    args = args_for(maml_gs, gs=gs, gs_source="both" if source == "none" else source)
    params = with_gs(tiny_params()) if gs else tiny_params()
    if source in ("batch", "history"):
        params.pop("m")
    state = later_state(maml_gs, params, tasks, args) if gs else {"ghat": None}

    def step(p):
        result = maml_gs.meta_gradient(p, state, tasks, 0, args)
        return result.loss, result.grads
    assert check_finite_differences(step, params) >= len(params)


@pytest.mark.parametrize("gs", [False, True])
def test_metasgd_meta_gradient_matches_finite_differences_for_theta_alpha_m_lambda(gs):
    tasks, args = tiny_tasks(), args_for(metasgd_gs, gs=gs)
    params = tiny_params()
    gen = torch.Generator().manual_seed(5)
    params.update({metasgd_gs.ALPHA + n: (LR + 0.05 * torch.randn(p.shape, generator=gen, dtype=DTYPE))
                   .requires_grad_() for n, p in list(params.items())})
    if gs:
        params = with_gs(params)
    state = later_state(metasgd_gs, params, tasks, args) if gs else {"ghat": None}

    def step(p):
        result = metasgd_gs.meta_gradient(p, state, tasks, 0, args)
        return result.loss, result.grads
    assert check_finite_differences(step, params) >= len(params)


@pytest.mark.parametrize("base", ["maml", "boil"])
def test_cml_meta_gradient_matches_finite_differences_for_theta_and_the_colearner(base):
    tasks, args = tiny_tasks(), args_for(cml, base=base, gamma=0.7, grad_stats_every=0)
    params = tiny_params(colearner_blocks=1)
    assert {n for n in params if n.startswith(cml.COLEARNER)} == {
        "colearner.fc0.weight", "colearner.fc0.bias", "colearner.head.weight", "colearner.head.bias"}

    def step(p):
        result = cml.meta_gradient(p, {"epoch": 0, "steps": 0}, tasks, 0, args)
        return result.loss, result.grads
    assert check_finite_differences(step, params) == len(params)


def test_cml_colearner_reads_the_mlps_last_hidden_layer():
    params, tasks = tiny_params(colearner_blocks=0), tiny_tasks()
    theta, _, _, phi = cml.split_params(params, args_for(cml))
    both = cml.both_heads(phi)(theta, tasks.x_q[0])
    z = common.mlp_features(theta, tasks.x_q[0])  # (N, 4): the head's input
    torch.testing.assert_close(both, torch.cat([common.mlp_forward(theta, tasks.x_q[0]),
                                                z @ phi["head.weight"].T + phi["head.bias"]], -1))


def test_lwdgh_per_task_meta_gradients_match_finite_differences():
    params, tasks, args = tiny_params(), tiny_tasks(), args_for(lwdgh)
    task_grads, losses, mse = lwdgh.task_gradients(params, tasks, args)
    torch.testing.assert_close(mse, losses.mean())  # the logged score of a regression step: the query MSE
    for t in range(TASKS):
        one = common.Tasks(*(x[t:t + 1] for x in tasks))

        def step(p):
            grads, loss, _ = lwdgh.task_gradients(p, one, args)
            return loss[0], {n: g[0] for n, g in grads.items()}
        loss, grads = step(params)
        assert loss == pytest.approx(float(losses[t]), rel=1e-12)
        for n in grads:
            torch.testing.assert_close(grads[n], task_grads[n][t], rtol=1e-9, atol=1e-12)
        assert check_finite_differences(step, params) == len(params)


# ---- evaluation and the run's files ----
def test_an_ensemble_of_identical_members_is_a_single_member_and_averages_predictions():
    tasks = common.SinusoidEvalTasks("test", SHOTS, QUERIES, 5, seed=0, device="cpu")
    one = lambda t: 2 * t.x_q  # noqa: E731
    other = lambda t: torch.zeros_like(t.x_q)  # noqa: E731
    ensemble, first = common.evaluate([one, one, one], tasks, 2)
    torch.testing.assert_close(ensemble, first, rtol=0, atol=0)
    ensemble, _ = common.evaluate([one, other], tasks, 2)  # the mean prediction x_q, then its MSE
    want = ((tasks.tasks.x_q - tasks.tasks.y_q).double() ** 2).mean((1, 2))
    torch.testing.assert_close(ensemble, want)


def run(tmp_path: Path, program: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / program), *RUN, *flags], capture_output=True, text=True,
                          cwd=tmp_path)


@pytest.mark.parametrize("module", [maml_gs, metasgd_gs, cml, lwdgh], ids=lambda m: m.__name__)
def test_a_run_ranks_by_the_lowest_validation_mse_and_reports_mse(tmp_path, module):
    out = tmp_path / "run"
    result = module.main(RUN + ["--out", str(out)])
    assert json.loads((out / "result.json").read_text()) == result
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_mse,val_mse,val_ci")
    val = {int(r.split(",")[0]): float(r.split(",")[3]) for r in rows[1:]}
    ranked = sorted(val, key=lambda e: (val[e], e))
    assert result["ensemble_epochs"] == ranked[:2] and result["min_val_epoch"] == ranked[0]
    assert result["min_val_mse"] == val[ranked[0]] and "max_val_acc" not in result
    assert result["test_mse_ensemble"] > 0 and result["test_mse_best"] > 0 and result["test_tasks"] == 6
    assert json.loads((out / "config.json").read_text())["data"]["test"]["amplitude"] == [0.1, 5.0]


def test_a_killed_sinusoid_run_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    from test_cli import Crash, metrics
    argv = RUN + ["--gs"]
    reference = maml_gs.main(argv + ["--out", str(tmp_path / "ref")])
    original, calls = common.SinusoidSampler.sample, []

    def sample(self):
        calls.append(1)
        if len(calls) == 6:  # in epoch 2, after one checkpoint: the sampler's stream and the stored ĝ must survive
            raise Crash()
        return original(self)
    monkeypatch.setattr(common.SinusoidSampler, "sample", sample)
    with pytest.raises(Crash):
        maml_gs.main(argv + ["--out", str(tmp_path / "run")])
    monkeypatch.undo()
    assert maml_gs.main(["--resume", str(tmp_path / "run"), "--quiet"]) == reference
    assert metrics(tmp_path / "run") == metrics(tmp_path / "ref")


@pytest.mark.parametrize("flags, message", [
    (["--shots", "0"], "--shots must be a positive integer"),
    (["--backbone", "conv4"], "--backbone conv4 with --dataset sinusoid"),
    (["--ways", "5"], "a sinusoid task is one function"),
    (["--filters", "32"], "--filters applies to image data sets only"),
    (["--adapt-bn"], "--adapt-bn applies to image data sets only"),
])
def test_bad_values_are_messages(tmp_path, flags, message):
    done = run(tmp_path, "maml_gs.py", *flags)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_an_image_dataset_on_the_mlp_and_mamlpp_on_the_sinusoid_are_messages(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "maml_gs.py"), "--dataset", "synthetic", "--backbone", "mlp"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "--backbone mlp with --dataset synthetic" in done.stderr
    done = run(tmp_path, "mamlpp_gs.py")
    assert done.returncode == 2 and "per-step BatchNorm" in done.stderr and "maml_gs.py" in done.stderr
    done = run(tmp_path, "cml.py", "--base", "mamlpp")
    assert done.returncode == 2 and "--base maml, boil or sharpmaml" in done.stderr


def test_the_report_puts_each_row_beside_the_published_numbers_and_its_curve_starts_from_the_runs_test(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import sinusoid_report
    runs = tmp_path / "runs"
    maml = maml_gs.main(RUN + ["--no-gs", "--out", str(runs / "maml_og__sinusoid__k5__1")])
    cml.main(RUN + ["--out", str(runs / "cml_maml__sinusoid__k5__1")])
    assert sinusoid_report.main(["--runs", str(runs), "--out", str(tmp_path / "results")]) == 0
    text = (tmp_path / "results" / "sinusoid.md").read_text()
    assert f"| MAML | {maml['test_mse_best']:.3f} ± {maml['test_ci_best']:.3f} |" in text
    assert "| MAML + CML |" in text and "MAML (ours) 0.67 / 0.38 / 0.35" in text and "arXiv 1707.09835" in text
    curve = next(line for line in text.splitlines() if line.startswith("| MAML, K = 5 |")).split(" | ")
    assert float(curve[2]) == pytest.approx(maml["test_mse_best"], abs=5e-4)  # k = 1: the run's own inner step
    assert (tmp_path / "results" / "sinusoid" / "mse_by_steps.png").stat().st_size > 0
    assert sinusoid_report.main(["--runs", str(tmp_path / "none"), "--out", str(tmp_path / "results")]) == 1


def test_a_non_finite_validation_mse_ranks_last_and_is_never_the_best():
    """A diverged regression's NaN or inf MSE: worst in the checkpoints' ranking and for the best epoch."""
    scores = [0.5, math.nan, 0.2, math.inf, 0.2]
    ranked = sorted(range(len(scores)), key=lambda e: (-common.MSE.ranked(scores[e]), e))
    assert ranked[:3] == [2, 4, 0] and set(ranked[3:]) == {1, 3}
    assert common.ACCURACY.ranked(0.7) > common.ACCURACY.ranked(0.6) > common.ACCURACY.ranked(math.nan)


def test_compare_prints_mse_for_sinusoid_runs(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import compare
    maml_gs.main(RUN + ["--no-gs", "--out", str(tmp_path / "og")])
    result = maml_gs.main(RUN + ["--gs", "--out", str(tmp_path / "gs")])
    compare.main([str(tmp_path / "og"), str(tmp_path / "gs")])
    out = capsys.readouterr().out
    assert "meta-validation MSE per epoch" in out and f"test ensemble {result['test_mse_ensemble']:.4f}" in out

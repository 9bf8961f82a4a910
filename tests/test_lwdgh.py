"""lwdgh.py: GCI and weights by hand, per-task meta-gradients against finite differences and a plain
per-task loop, the explore and exploit updates, the schedule, the command line."""
import csv
import io
import math
import signal

import pytest
import torch
import torch.nn.functional as F

import common
import lwdgh
import maml_gs

DTYPE = torch.float64
SHAPE = (1, 8, 8)  # tiny images: 2 conv blocks take 8×8 to 2×2
WAYS, SHOTS, QUERIES, TASKS, FILTERS, BLOCKS = 3, 2, 2, 3, 4, 2
STEPS, LR = 2, 0.4  # a large α makes the second-order terms matter


def tiny_params(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    theta = common.conv4_init(SHAPE, WAYS, FILTERS, BLOCKS, generator=gen, dtype=DTYPE)
    # Move every tensor off its initial value (BN scale 1, zero biases) so that no term vanishes by symmetry.
    return {n: (p + 0.2 * torch.randn(p.shape, generator=gen, dtype=DTYPE)).requires_grad_() for n, p in theta.items()}


def tiny_tasks(seed: int = 1, tasks: int = TASKS) -> common.Tasks:
    gen = torch.Generator().manual_seed(seed)
    def labels(per_class):
        return torch.arange(WAYS).repeat_interleave(per_class).repeat(tasks, 1)
    return common.Tasks(torch.randn(tasks, WAYS * SHOTS, *SHAPE, generator=gen, dtype=DTYPE), labels(SHOTS),
                        torch.randn(tasks, WAYS * QUERIES, *SHAPE, generator=gen, dtype=DTYPE), labels(QUERIES))


def fresh_state(seed: int = 0) -> dict:
    return {"rng": torch.Generator().manual_seed(seed).get_state()}


def tiny_args(use_vmap=False, **kwargs) -> lwdgh.Args:
    return lwdgh.Args(inner_steps=STEPS, inner_lr=LR, vmap="on" if use_vmap else "off", **kwargs)


def run_step(params, tasks, p_explore, state=None, epoch=0, use_vmap=False, first_order=False):
    args = tiny_args(use_vmap, p_min=p_explore, p_max=p_explore, first_order=first_order)  # p_e = p_explore
    return lwdgh.meta_gradient(params, state or fresh_state(), tasks, epoch, args)


def maml_step(params, tasks):
    return maml_gs.meta_gradient(params, {"ghat": None}, tasks, 0,
                                 maml_gs.Args(inner_steps=STEPS, inner_lr=LR, gs=False, vmap="off"))


def reference_task_loss(params, tasks, t):
    """L_t^query(θ_{t,K}) written out plainly for one task: K steps of θ ← θ − α ∇L_t^support on θ but its
    BatchNorm tensors, which stay θ's (the outer loop's alone)."""
    fast = {n: p for n, p in params.items() if not n.startswith("bn")}
    bn = {n: p for n, p in params.items() if n.startswith("bn")}
    for _ in range(STEPS):
        loss = F.cross_entropy(common.conv4_forward({**fast, **bn}, tasks.x_s[t]), tasks.y_s[t])
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {n: w - LR * g for (n, w), g in zip(fast.items(), grads)}
    return F.cross_entropy(common.conv4_forward({**fast, **bn}, tasks.x_q[t]), tasks.y_q[t])


def reference_task_grads(params, tasks) -> list[dict[str, torch.Tensor]]:
    return [dict(zip(params, torch.autograd.grad(reference_task_loss(params, tasks, t), list(params.values()))))
            for t in range(tasks.x_s.shape[0])]


def test_gci_and_weights_match_a_hand_computation():
    # Two tasks, one layer of 2 numbers: g_1 = (3, 0), g_2 = (0, 1); ḡ = (1.5, 0.5), ‖ḡ‖ = √2.5.
    g = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=DTYPE)
    norm_mean = math.sqrt(2.5)
    cos = [4.5 / (3 * norm_mean), 0.5 / (1 * norm_mean)]
    gci = [3 * (1 - cos[0]), 1 * (1 - cos[1])]
    torch.testing.assert_close(lwdgh.gci(g, g.mean(0)), torch.tensor(gci, dtype=DTYPE), rtol=1e-14, atol=1e-15)
    # A second layer (2×1 per task) where the two tasks disagree in sign only: equal GCI, equal weights.
    h = torch.tensor([[[2.0], [0.0]], [[-2.0], [0.0]]], dtype=DTYPE)
    harmonised, weights, _ = lwdgh.harmonise({"a": g, "b": h})
    w = [math.exp(-gci[0]) / (math.exp(-gci[0]) + math.exp(-gci[1]))]
    w.append(1 - w[0])
    torch.testing.assert_close(weights, torch.tensor([w, [0.5, 0.5]], dtype=DTYPE), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(harmonised["a"], torch.tensor([3 * w[0], w[1]], dtype=DTYPE), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(harmonised["b"], torch.zeros(2, 1, dtype=DTYPE))
    # ‖ḡ‖ = 0 (here for layer b): cos counts as 0, GCI = ‖g_t‖, no NaN.
    torch.testing.assert_close(lwdgh.gci(h.flatten(1), h.flatten(1).mean(0)), torch.tensor([2.0, 2.0], dtype=DTYPE))


@pytest.mark.parametrize("use_vmap", [False, True], ids=["loop", "vmap"])
def test_per_task_meta_gradients_match_an_independent_per_task_loop(use_vmap):
    params, tasks = tiny_params(), tiny_tasks()
    task_grads, losses, _ = lwdgh.task_gradients(params, tasks, tiny_args(use_vmap))
    want = reference_task_grads(params, tasks)
    want_losses = torch.stack([reference_task_loss(params, tasks, t) for t in range(TASKS)]).detach()
    torch.testing.assert_close(losses, want_losses, rtol=1e-12, atol=1e-12)
    for t in range(TASKS):
        for name, g in task_grads.items():
            torch.testing.assert_close(g[t], want[t][name], rtol=1e-9, atol=1e-12, msg=f"task {t} {name}")


@pytest.mark.parametrize("use_vmap", [False, True], ids=["loop", "vmap"])
def test_recomputing_the_inner_steps_gives_the_same_per_task_meta_gradients(use_vmap):
    params, tasks = tiny_params(), tiny_tasks()
    stored, recomputed = (lwdgh.task_gradients(params, tasks, tiny_args(use_vmap, recompute=recompute))
                          for recompute in (False, True))
    torch.testing.assert_close(recomputed[1], stored[1], rtol=1e-14, atol=0)
    for name, g in stored[0].items():
        torch.testing.assert_close(recomputed[0][name], g, rtol=1e-12, atol=1e-15, msg=name)


def test_per_task_meta_gradients_match_central_finite_differences():
    params, tasks = tiny_params(), tiny_tasks()
    task_grads, _, _ = lwdgh.task_gradients(params, tasks, tiny_args())
    gen, eps = torch.Generator().manual_seed(3), 1e-6
    for name, p in params.items():
        direction = torch.randn(p.shape, generator=gen, dtype=DTYPE)
        for t in range(TASKS):
            def loss_at(sign):
                shifted = {n: (q + sign * eps * direction if n == name else q).detach().requires_grad_()
                           for n, q in params.items()}
                return reference_task_loss(shifted, tasks, t).item()
            numeric = (loss_at(1) - loss_at(-1)) / (2 * eps)
            analytic = float((task_grads[name][t] * direction).sum())
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8), (name, t)


def test_identical_tasks_give_uniform_weights_and_exactly_the_maml_update():
    one = tiny_tasks(tasks=1)
    same = common.Tasks(*(x.expand(TASKS, *x.shape[1:]) for x in one))
    params = tiny_params()
    result = run_step(params, same, p_explore=0.0)  # exploit: the harmonised gradient
    assert result.metrics["explore_fraction"] == 0
    assert result.metrics["weight_entropy"] == pytest.approx(math.log(TASKS), rel=1e-14)
    for name, g in maml_step(params, same).grads.items():
        torch.testing.assert_close(result.grads[name], g, rtol=1e-12, atol=1e-15, msg=name)


def test_explore_steps_use_the_plain_mean_and_exploit_steps_the_harmonised_gradient():
    params, tasks = tiny_params(), tiny_tasks()
    explore, exploit, maml = run_step(params, tasks, 1.0), run_step(params, tasks, 0.0), maml_step(params, tasks)
    harmonised, _, _ = lwdgh.harmonise({name: torch.stack([g[name] for g in reference_task_grads(params, tasks)])
                                     for name in params})
    assert explore.metrics["explore_fraction"] == 1 and exploit.metrics["explore_fraction"] == 0
    for name in params:
        torch.testing.assert_close(explore.grads[name], maml.grads[name], rtol=1e-12, atol=1e-15, msg=name)
        torch.testing.assert_close(exploit.grads[name], harmonised[name], rtol=1e-9, atol=1e-12, msg=name)
        assert not torch.allclose(exploit.grads[name], maml.grads[name], rtol=1e-6, atol=0), name
    torch.testing.assert_close(explore.loss, maml.loss, rtol=1e-14, atol=0)


def test_explore_draws_come_from_the_state_generator_not_the_global_rng():
    params, tasks, p = tiny_params(), tiny_tasks(tasks=2), 0.5
    draws = 16
    def decisions():
        state, out = fresh_state(), []
        for _ in range(draws):
            result = run_step(params, tasks, p, state)
            state = result.state
            out.append(result.metrics["explore_fraction"])
        return out, state
    torch.manual_seed(0)
    first, state = decisions()
    global_rng = torch.get_rng_state()
    torch.manual_seed(12345)
    second, _ = decisions()
    assert first == second and 0 < sum(first) < draws  # both kinds of step occur
    gen = torch.Generator().manual_seed(0)
    want = [float(torch.rand((), generator=gen).item() < p) for _ in range(draws)]
    assert first == want
    torch.manual_seed(0)
    decisions()
    assert torch.equal(torch.get_rng_state(), global_rng)  # no draw from the global RNG


def test_conflict_numbers_of_a_step():
    params, tasks = tiny_params(), tiny_tasks(tasks=2)
    numbers = run_step(params, tasks, 0.0).metrics
    # GCI w.r.t. ḡ is the smallest over all reference directions (Cauchy–Schwarz): g_u never beats it.
    assert 0 < numbers["gci_mean"] <= numbers["gci_harmonised"]
    assert 0 < numbers["weight_entropy"] <= math.log(2)


@pytest.mark.parametrize("schedule", ["cosine", "fixed"])
def test_explore_probability_at_0_half_E_E_and_after(schedule):
    def p(epoch, epochs=100):  # E = 0.1 · 100 = 10
        return lwdgh.explore_probability(epoch, lwdgh.Args(epochs=epochs, transition=0.1, p_min=0.1, p_max=0.9,
                                                           schedule=schedule))
    middle = 0.5 if schedule == "cosine" else 0.9  # cosine: halfway between p_max and p_min at E/2
    assert p(0) == pytest.approx(0.9) and p(5) == pytest.approx(middle)
    assert p(10) == pytest.approx(0.1) and p(17) == pytest.approx(0.1)
    before = 0.1 + 0.4 * (1 + math.cos(math.pi * 0.2)) if schedule == "cosine" else 0.9
    assert p(2) == pytest.approx(before)
    assert p(0, epochs=4) == 0.1  # E = round(0.4) = 0: p_min from the start
    assert lwdgh.explore_probability(0, lwdgh.Args(p_min=0.1, p_max=0.9, ee=False)) == 0.0  # --no-ee: never


TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--filters", "8", "--tasks", "2",
        "--ways", "3", "--queries", "2", "--inner-steps", "2", "--test-inner-steps", "3", "--epochs", "3",
        "--iters-per-epoch", "3", "--val-tasks", "6", "--test-tasks", "6", "--ensemble", "2", "--quiet"]


def columns(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("flags", [[], ["--no-ee"], ["--schedule", "fixed"]])
def test_synthetic_run_logs_the_conflict_numbers(tmp_path, flags):
    result = lwdgh.main(TINY + flags + ["--out", str(tmp_path / "run")])
    assert result["status"] == "finished" and result["epochs_run"] == 3
    rows = columns(tmp_path / "run")
    explore = [float(row["explore_fraction"]) for row in rows]
    # E = round(0.33 · 3) = 1: epoch 1 explores with p_max = 1, later epochs with p_min = 0.
    assert explore == ([0.0, 0.0, 0.0] if flags == ["--no-ee"] else [1.0, 0.0, 0.0])
    for row in rows:
        assert 0 < float(row["gci_mean"]) <= float(row["gci_harmonised"])
        assert 0 < float(row["weight_entropy"]) <= math.log(2) + 1e-6


def test_sigterm_mid_epoch_resumes_to_the_same_draws_and_numbers(tmp_path, monkeypatch):
    """The explore draws and the epoch sums live in the checkpointed state: a resumed run repeats them exactly."""
    argv = TINY + ["--p-min", "0.5", "--p-max", "0.5", "--iters-per-epoch", "4"]
    reference = lwdgh.main(argv + ["--out", str(tmp_path / "ref")])
    original, calls = common.TaskSampler.sample, []
    def sample(self):  # SIGTERM during the 2nd meta-iteration of epoch 2
        calls.append(1)
        if len(calls) == 6:
            signal.raise_signal(signal.SIGTERM)
        return original(self)
    monkeypatch.setattr(common.TaskSampler, "sample", sample)
    with pytest.raises(SystemExit):
        lwdgh.main(argv + ["--out", str(tmp_path / "run")])
    monkeypatch.undo()
    resumed = lwdgh.main(["--resume", str(tmp_path / "run"), "--quiet"])
    assert resumed == reference
    def numbers(run_dir):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in columns(run_dir)]
    assert numbers(tmp_path / "run") == numbers(tmp_path / "ref")
    assert 0 < sum(float(row["explore_fraction"]) for row in numbers(tmp_path / "ref")) < 3  # both kinds drawn
    assert task_rows(tmp_path / "run") == task_rows(tmp_path / "ref")  # the per-task sample too


def task_rows(run_dir) -> list[dict]:
    with open(run_dir / "tasks.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_each_tasks_loss_and_gci_are_reported_and_add_up_to_the_logged_ones():
    params, tasks = tiny_params(), tiny_tasks()
    step = run_step(params, tasks, p_explore=1.0)
    want = torch.stack([reference_task_loss(params, tasks, t) for t in range(TASKS)]).detach()
    torch.testing.assert_close(step.per_task["loss"], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.loss, want.mean(), rtol=1e-12, atol=1e-12)
    grads = reference_task_grads(params, tasks)
    flat = torch.stack([torch.cat([g[n].flatten() for n in params]) for g in grads])  # (tasks, n)
    torch.testing.assert_close(step.per_task["gci"], lwdgh.gci(flat, flat.mean(0)), rtol=1e-9, atol=1e-12)
    assert step.metrics["gci_mean"] == pytest.approx(float(step.per_task["gci"].sum()), rel=1e-12)


class Crash(BaseException):
    """Stands for kill -9."""


def test_a_kill_after_tasks_csv_grew_but_before_its_checkpoint_repeats_no_row(tmp_path, monkeypatch):
    """tasks.csv is appended once per epoch; a process killed between the append and the checkpoint that counts
    it leaves rows that the resumed run's next append cuts off: it ends with the uninterrupted run's file."""
    lwdgh.main(TINY + ["--out", str(tmp_path / "ref")])
    original, appended = common.append_csv, []
    def append_csv(path, rows, size):
        appended.append(original(path, rows, size))
        if len(appended) == 2:  # epoch 2's rows are in the file, its checkpoint not yet written
            raise Crash()
        return appended[-1]
    monkeypatch.setattr(common, "append_csv", append_csv)
    with pytest.raises(Crash):
        lwdgh.main(TINY + ["--out", str(tmp_path / "run")])
    monkeypatch.undo()
    assert len(task_rows(tmp_path / "run")) == 2 * len(task_rows(tmp_path / "ref")) // 3  # epochs 1 and 2
    lwdgh.main(["--resume", str(tmp_path / "run"), "--quiet"])
    assert (tmp_path / "run" / "tasks.csv").read_bytes() == (tmp_path / "ref" / "tasks.csv").read_bytes()


def test_tasks_csv_holds_the_first_meta_iterations_of_every_epoch(tmp_path, monkeypatch):
    """common.Run keeps StepResult.per_task of the first TASK_LOG meta-iterations per epoch (Figure 2 of the LWDGH
    paper, "Cross-Task Gradient Harmonization for Meta-Learning")."""
    monkeypatch.setattr(common, "TASK_LOG", 2)
    lwdgh.main(TINY + ["--out", str(tmp_path / "run")])  # 3 epochs × 3 iterations
    rows = task_rows(tmp_path / "run")
    assert [(int(r["epoch"]), int(r["iteration"]), int(r["task"])) for r in rows] == [
        (e, i, t) for e in (1, 2, 3) for i in (1, 2) for t in (0, 1)]  # 2 tasks per batch
    assert all(float(r["loss"]) > 0 and math.isfinite(float(r["gci"])) for r in rows)
    epoch_1 = [float(r["gci"]) for r in rows if r["epoch"] == "1"]
    assert len(set(epoch_1)) == len(epoch_1)  # every task its own number


def test_omniglot_small(tmp_path, shared_data):
    result = lwdgh.main([
        "--dataset", "omniglot", "--data-root", str(shared_data), "--cache-dir", str(tmp_path / "cache"),
        "--filters", "8", "--tasks", "2", "--inner-steps", "1", "--test-inner-steps", "2", "--epochs", "2",
        "--iters-per-epoch", "2", "--val-tasks", "5", "--test-tasks", "5", "--quiet", "--out", str(tmp_path / "run")])
    assert result["status"] == "finished" and result["epochs_run"] == 2


def test_validation_adapts_with_the_training_steps_and_the_meta_test_with_the_test_steps(tmp_path, monkeypatch):
    """fmu2's protocol: meta-validation with the training inner loop (--inner-steps), meta-test with
    --test-inner-steps."""
    args = lwdgh.Args(dataset="synthetic", filters=FILTERS, ways=WAYS, inner_steps=1, test_inner_steps=3, inner_lr=LR)
    params, state = lwdgh.init_params(args, (1, 16, 16), torch.device("cpu")), lwdgh.init_state(args)
    gen = torch.Generator().manual_seed(4)
    x_s, x_q = (torch.randn(2, WAYS * n, 1, 16, 16, generator=gen) for n in (SHOTS, QUERIES))
    tasks = common.Tasks(x_s, torch.arange(WAYS).repeat_interleave(SHOTS).repeat(2, 1),
                         x_q, torch.arange(WAYS).repeat_interleave(QUERIES).repeat(2, 1))
    def adapted(steps):
        return lwdgh.predict(params, state, tasks, lwdgh.Args(inner_steps=steps, inner_lr=LR))
    validation = lwdgh.predict(params, state, tasks, args)
    test = lwdgh.predict(params, state, tasks, args, args.test_inner_steps)
    torch.testing.assert_close(validation, adapted(1), rtol=0, atol=0)
    torch.testing.assert_close(test, adapted(3), rtol=0, atol=0)
    assert not torch.allclose(validation, test)
    # main: every validation with --inner-steps (inner_steps None), the meta-test with --test-inner-steps
    original, steps = lwdgh.predict, []
    def predict(params, state, tasks, args, inner_steps=None):
        steps.append(inner_steps)
        return original(params, state, tasks, args, inner_steps)
    monkeypatch.setattr(lwdgh, "predict", predict)
    lwdgh.main(TINY + ["--inner-steps", "1", "--test-inner-steps", "3", "--out", str(tmp_path / "run")])
    validated = 3  # TINY: 3 epochs, each validating its 6 tasks in one batch of --eval-batch 25
    assert steps[:validated] == [None] * validated and steps[validated:] == [3, 3]  # 2 models, 1 batch


def test_the_meta_gradient_is_clamped_as_fmu2_clamps_it():
    params, tasks = tiny_params(), tiny_tasks()
    free = lwdgh.meta_gradient(params, fresh_state(), tasks, 0, tiny_args(clip_grad=0.0)).grads
    clip = 0.5 * min(float(g.abs().max()) for g in free.values())
    clamped = lwdgh.meta_gradient(params, fresh_state(), tasks, 0, tiny_args(clip_grad=clip)).grads
    assert all(torch.equal(clamped[n], g.clamp(-clip, clip)) for n, g in free.items())
    assert lwdgh.Args().clip_grad == 10.0  # fmu2's train.py: clip_grad_value_(param, 10)


def test_defaults_follow_the_paper_and_bad_probabilities_are_rejected():
    args = lwdgh.Args()
    assert (args.tasks, args.inner_lr, args.inner_steps, args.test_inner_steps, args.transition) == (
        4, 0.01, 5, 10, 0.33)
    assert any("--p-min" in p for p in lwdgh.Args(p_min=0.8, p_max=0.2).check())
    assert any("--transition" in p for p in lwdgh.Args(transition=1.5).check())


def crash_in_epoch_3(monkeypatch, argv):
    """Stands for kill -9 during epoch 3: the run's files are those of the end of epoch 2."""
    original, calls = common.TaskSampler.sample, []
    def sample(self):
        calls.append(1)
        if len(calls) == 8:  # 3 meta-iterations per epoch: the 2nd of epoch 3
            raise Crash()
        return original(self)
    monkeypatch.setattr(common.TaskSampler, "sample", sample)
    with pytest.raises(Crash):
        lwdgh.main(argv)
    monkeypatch.undo()


@pytest.mark.parametrize("damage", ["cut mid-row", "deleted"])
def test_a_tasks_csv_shorter_than_its_checkpoint_says_is_repaired_on_resume(tmp_path, monkeypatch, capsys, damage):
    """A host crash can lose the end of tasks.csv (appended, fsynced, but last.pt may reach the disk first), or a user
    deletes it: the resumed run keeps the complete rows, never writes NULs, notes the loss and finishes."""
    lwdgh.main(TINY + ["--out", str(tmp_path / "ref")])
    crash_in_epoch_3(monkeypatch, TINY + ["--out", str(tmp_path / "run")])
    path = tmp_path / "run" / "tasks.csv"
    full = path.read_bytes()
    cut = len(full) * 2 // 3 + 5  # inside a row of epoch 2
    assert full[cut - 1:cut] != b"\n"
    if damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(full[:cut])
    result = lwdgh.main(["--resume", str(tmp_path / "run"), "--quiet"])
    assert result["status"] == "finished" and "tasks.csv held" in capsys.readouterr().err
    assert any("tasks.csv held" in note for note in result["notes"])
    data = path.read_bytes()
    assert b"\0" not in data
    ref_rows, rows = task_rows(tmp_path / "ref"), task_rows(tmp_path / "run")
    kept = [] if damage == "deleted" else list(csv.DictReader(io.StringIO(full[:cut].decode())))[:-1]
    epoch_3 = [row for row in ref_rows if row["epoch"] == "3"]
    assert rows == kept + epoch_3 and len(kept) < len(ref_rows) - len(epoch_3)

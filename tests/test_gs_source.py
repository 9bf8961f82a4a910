"""--gs-source: gradient sharing's batch and history parts taken apart, in maml_gs.py, metasgd_gs.py and mamlpp_gs.py.
`batch` is `both` with σ(m_k) = 1; `history` against an independent per-task loop; finite differences for every
meta-parameter of each mode; the three modes differ; the command line."""
import json

import pytest
import torch
import torch.nn.functional as F

import common
import maml_gs
import mamlpp_gs
import metasgd_gs
import test_maml_gs as tm
import test_mamlpp_gs as tpp
import test_metasgd_gs as tsgd
from test_cli import TINY

PINNED = 50.0  # σ(50) is 1 in float64: Eq. 3 keeps g_k alone


def setup(module, mode: str, later: bool = True):
    """(params, state, tasks, args) of a float64 tiny meta-iteration of module under --gs-source mode."""
    helpers = {maml_gs: tm, metasgd_gs: tsgd, mamlpp_gs: tpp}[module]
    params = helpers.tiny_params()
    if mode != "both":
        del params["m"]
    extra = {"per_step_bn": True, "msl_epochs": tpp.MSL_EPOCHS, "lslr": True} if module is mamlpp_gs else {}
    args = helpers.tiny_args(module=module, gs_source=mode, **extra) if module is not maml_gs else \
        helpers.tiny_args(gs_source=mode)
    ghat = helpers.stored_ghat(params) if later else None
    return params, {"ghat": ghat}, helpers.tiny_tasks(), args


MODULES = [maml_gs, metasgd_gs, mamlpp_gs]
IDS = ["maml", "metasgd", "mamlpp"]


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_batch_is_both_with_the_momentum_pinned_to_one(module):
    params, state, tasks, args = setup(module, "batch")
    batch = module.meta_gradient(params, state, tasks, 0, args)
    pinned = {**params, "m": torch.full_like(params["lambda"], PINNED).requires_grad_()}
    both = module.meta_gradient(pinned, state, tasks, 0, setup(module, "both")[3])
    torch.testing.assert_close(batch.loss, both.loss, rtol=1e-12, atol=0)
    for name in params:
        torch.testing.assert_close(batch.grads[name], both.grads[name], rtol=1e-10, atol=1e-14)
    for new, old in zip(batch.state["ghat"], both.state["ghat"]):
        for name in new:
            torch.testing.assert_close(new[name], old[name], rtol=1e-12, atol=1e-15)
    assert "sigma_m" not in batch.metrics
    assert "m" not in module.init_params(args, (1, 16, 16), torch.device("cpu"))  # Conv4: 16×16 at least


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_history_adapts_with_the_stored_mean_as_algorithm_2_does(module):
    """history's training step shares the stored ĝ only: its query loss is predict's (Algorithm 2) on the batch.
    MAML++ past its multi-step-loss epochs, where the loss is the last step's alone."""
    params, state, tasks, args = setup(module, "history")
    epoch = tpp.MSL_EPOCHS if module is mamlpp_gs else 0
    step = module.meta_gradient(params, state, tasks, epoch, args)
    logits = module.predict(params, state, tasks, args)
    want = torch.stack([F.cross_entropy(logits[t], tasks.y_q[t]) for t in range(len(logits))]).mean()
    torch.testing.assert_close(step.loss, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["batch", "history"])
@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_predict_is_algorithm_2_in_every_mode_and_leaves_the_stored_mean(module, mode):
    params, state, tasks, args = setup(module, mode)
    before = [{name: g.clone() for name, g in ghat_k.items()} for ghat_k in state["ghat"]]
    with_m, _, _, both_args = setup(module, "both")
    torch.testing.assert_close(module.predict(params, state, tasks, args),
                               module.predict(with_m, state, tasks, both_args), rtol=0, atol=0)
    assert all(torch.equal(state["ghat"][k][n], before[k][n]) for k in range(len(before)) for n in before[k])


def history_reference(params, ghat, tasks):
    """maml_gs --gs-source history written out plainly: per task, K steps sharing the stored ĝ_k only; the new ĝ_k
    from this batch's normalised Σ_t ∇L_t with momentum ½ (Eq. 2 on the first meta-iteration)."""
    theta = {n: params[n] for n in tm.adapted_names(params)}
    fixed = {n: p for n, p in params.items() if n not in theta and n not in maml_gs.GS_PARAMS}
    lam, count = params["lambda"], tasks.x_s.shape[0]
    step_grads = [[None] * count for _ in range(tm.STEPS)]
    losses = []
    for t in range(count):
        w = dict(theta)
        for k in range(tm.STEPS):
            loss = F.cross_entropy(common.conv4_forward({**fixed, **w}, tasks.x_s[t]), tasks.y_s[t])
            grads = dict(zip(w, torch.autograd.grad(loss, list(w.values()), create_graph=True)))
            step_grads[k][t] = grads
            gate = torch.sigmoid(lam[k])
            w = {n: v - tm.LR * ((gate * ghat[k][n] + (1 - gate) * grads[n]) if ghat is not None else grads[n])
                 for n, v in w.items()}
        losses.append(F.cross_entropy(common.conv4_forward({**fixed, **w}, tasks.x_q[t]), tasks.y_q[t]))
    new_ghat = []
    for k in range(tm.STEPS):
        total = {n: sum(step_grads[k][t][n] for t in range(count)).detach() for n in theta}
        norm = torch.sqrt(sum(v.square().sum() for v in total.values()))
        g_k = {n: v / norm for n, v in total.items()}
        new_ghat.append(g_k if ghat is None else {n: 0.5 * g_k[n] + 0.5 * ghat[k][n] for n in g_k})
    return sum(losses) / count, new_ghat


@pytest.mark.parametrize("later", [False, True], ids=["first-iteration", "later-iteration"])
def test_history_matches_an_independent_per_task_loop(later):
    params, state, tasks, args = setup(maml_gs, "history", later)
    step = maml_gs.meta_gradient(params, state, tasks, 0, args)
    loss, new_ghat = history_reference(params, state["ghat"], tasks)
    want = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    torch.testing.assert_close(step.loss, loss.detach(), rtol=1e-12, atol=0)
    for name in params:
        if want[name] is None:  # λ on the first meta-iteration: no ĝ to share yet
            assert step.grads[name] is None and name == "lambda" and not later
        else:
            torch.testing.assert_close(step.grads[name], want[name], rtol=1e-10, atol=1e-14)
    for got, expected in zip(step.state["ghat"], new_ghat):
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", ["batch", "history"])
@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_every_meta_parameter_of_each_mode_matches_central_finite_differences(module, mode):
    params, state, tasks, args = setup(module, mode)
    grads = module.meta_gradient(params, state, tasks, 0, args).grads
    gen, eps = torch.Generator().manual_seed(3), 1e-6

    def loss_at(name, direction):
        shifted = {n: (p + direction if n == name else p).detach().requires_grad_() for n, p in params.items()}
        return float(module.meta_gradient(shifted, state, tasks, 0, args).loss)

    for name, p in params.items():  # every tensor: θ, λ, Meta-SGD's α, MAML++'s LSLR rates and BN rows
        assert grads[name] is not None, name
        v = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        numeric = (loss_at(name, eps * v) - loss_at(name, -eps * v)) / (2 * eps)
        assert numeric == pytest.approx(float((grads[name] * v).sum()), rel=1e-5, abs=1e-8), name


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_the_three_modes_differ_on_a_random_batch(module):
    results = {mode: module.meta_gradient(*setup(module, mode)[:3], 0, setup(module, mode)[3])
               for mode in ("both", "batch", "history")}
    losses = {mode: float(r.loss) for mode, r in results.items()}
    assert len(set(losses.values())) == 3, losses
    ghats = {mode: torch.cat([g.flatten() for g in r.state["ghat"][0].values()]) for mode, r in results.items()}
    assert not torch.allclose(ghats["both"], ghats["batch"]) and not torch.allclose(ghats["batch"], ghats["history"])


@pytest.mark.parametrize("mode", ["batch", "history"])
def test_a_run_of_each_mode_finishes_logs_no_momentum_and_is_named_by_it(tmp_path, mode):
    result = maml_gs.main(TINY + ["--gs-source", mode, "--out", str(tmp_path / "run")])
    assert result["status"] == "finished"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["algorithm"] == f"maml_gs_{mode}" and config["gs_source"] == mode
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "sigma_lambda" in header and "sigma_m" not in header


def test_gs_source_without_gs_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        metasgd_gs.main(TINY + ["--no-gs", "--gs-source", "batch"])
    assert info.value.code == 2 and "--gs-source batch applies to --gs only" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["batch", "history"])
def test_a_killed_run_of_each_mode_resumes_to_the_same_numbers(tmp_path, monkeypatch, mode):
    from test_cli import Crash, interrupt_after, metrics
    argv = TINY + ["--gs-source", mode]
    reference = maml_gs.main(argv + ["--out", str(tmp_path / "ref")])

    def crash():
        raise Crash()
    interrupt_after(monkeypatch, 5, crash)  # in epoch 2, after one checkpoint: the stored ĝ must survive
    with pytest.raises(Crash):
        maml_gs.main(argv + ["--out", str(tmp_path / "run")])
    monkeypatch.undo()
    assert maml_gs.main(["--resume", str(tmp_path / "run"), "--quiet"]) == reference
    assert metrics(tmp_path / "run") == metrics(tmp_path / "ref")

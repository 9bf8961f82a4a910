"""cml.py: γ = 0 is the base method (maml_gs.py / mamlpp_gs.py, of which cml.py holds its own copy); φ is never
adapted; finite differences; an independent loop; the CLI."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cml
import common
import maml_gs
import mamlpp_gs
from test_cli import TINY

DTYPE = torch.float64
SHAPE = (1, 8, 8)  # tiny images: 2 conv blocks take 8×8 to 2×2
WAYS, SHOTS, QUERIES, TASKS, FILTERS, BLOCKS = 3, 2, 2, 3, 4, 2
STEPS, LR, GAMMA = 2, 0.4, 0.7  # a large α makes the second-order terms matter
STATS = ("loss_meta", "loss_co", "grad_cos", "grad_norm_ratio")  # cml.py's metrics


def tiny_args(module=cml, use_vmap=False, **kwargs):
    return module.Args(inner_steps=STEPS, inner_lr=LR, vmap="on" if use_vmap else "off", **kwargs)


def tiny_params(seed: int = 0, mamlpp: bool = False, colearner_blocks: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    theta = common.conv4_init(SHAPE, WAYS, FILTERS, BLOCKS, generator=gen, dtype=DTYPE)
    params = {**theta, **cml.colearner_init(theta, gen, colearner_blocks)}
    # Move every tensor off its initial value (BN scale 1, zero biases) so that no term vanishes by symmetry.
    params = {n: p + 0.2 * torch.randn(p.shape, generator=gen, dtype=DTYPE) for n, p in params.items()}
    if mamlpp:  # per-step BN rows and LSLR rates, each off its initial value too
        for n in [n for n in params if n.startswith("bn")]:
            params[n] = params[n] + 0.1 * torch.randn(STEPS, *params[n].shape, generator=gen, dtype=DTYPE)
        adapted = [n for n in params if not n.startswith(("bn", cml.COLEARNER))]
        params.update({cml.LSLR + n: LR + 0.05 * torch.randn(STEPS, generator=gen, dtype=DTYPE) for n in adapted})
    return {n: p.requires_grad_() for n, p in params.items()}


def tiny_tasks(seed: int = 1) -> common.Tasks:
    gen = torch.Generator().manual_seed(seed)
    def labels(per_class):
        return torch.arange(WAYS).repeat_interleave(per_class).repeat(TASKS, 1)
    return common.Tasks(torch.randn(TASKS, WAYS * SHOTS, *SHAPE, generator=gen, dtype=DTYPE), labels(SHOTS),
                        torch.randn(TASKS, WAYS * QUERIES, *SHAPE, generator=gen, dtype=DTYPE), labels(QUERIES))


def image_tasks(size: int = 28) -> common.Tasks:
    """tiny_tasks as float32 images of size×size, what a real run feeds the file's functions."""
    tasks = tiny_tasks()
    x_s, x_q = (F.interpolate(x.flatten(0, 1).float(), size=size).view(TASKS, -1, 1, size, size)
                for x in (tasks.x_s, tasks.x_q))
    return tasks._replace(x_s=x_s, x_q=x_q)


def base_params(params):
    """The base method's meta-parameters: all but φ."""
    return {n: p for n, p in params.items() if not n.startswith(cml.COLEARNER)}


def cml_step(params, tasks, gamma=GAMMA, steps=0, epoch=0, **kw):
    if kw.get("base") == "mamlpp":
        kw.setdefault("lslr", any(n.startswith(cml.LSLR) for n in params))
    return cml.meta_gradient(params, {"epoch": epoch, "steps": steps}, tasks, epoch, tiny_args(gamma=gamma, **kw))


def test_gamma_zero_is_maml_bitwise():
    params, tasks = tiny_params(), tiny_tasks()
    net = base_params(params)
    ours = cml_step(params, tasks, gamma=0.0)
    base = maml_gs.meta_gradient(net, {"ghat": None}, tasks, 0, tiny_args(maml_gs, gs=False))
    assert ours.metrics["loss_meta"] == base.loss.item() and torch.equal(ours.accuracy, base.accuracy)
    assert all(torch.equal(ours.grads[n], base.grads[n]) for n in net)
    assert all(torch.equal(ours.grads[n], torch.zeros_like(p)) for n, p in params.items()
               if n.startswith(cml.COLEARNER))


def test_gamma_zero_is_mamlpp_bitwise():
    params, tasks = tiny_params(mamlpp=True), tiny_tasks()
    net = base_params(params)
    kw = dict(per_step_bn=True, msl_epochs=3, first_order_epochs=0, clip_grad=0.05)  # MSL on at epoch 1, a clamp
    ours = cml_step(params, tasks, gamma=0.0, epoch=1, base="mamlpp", **kw)
    base = mamlpp_gs.meta_gradient(net, {"ghat": None}, tasks, 1, tiny_args(mamlpp_gs, gs=False, **kw))
    assert ours.metrics["loss_meta"] == base.loss.item() and torch.equal(ours.accuracy, base.accuracy)
    assert all(torch.equal(ours.grads[n], base.grads[n]) for n in net)


def test_colearner_is_never_adapted():
    params, tasks = tiny_params(), tiny_tasks()
    theta, frozen, lslr, phi = cml.split_params(params, tiny_args())
    before = {n: p.detach().clone() for n, p in phi.items()}
    adapted = cml.inner_loop(theta, frozen, lslr, tasks, tiny_args(), create_graph=True)[-1]
    assert set(adapted) == set(base_params(params))  # the inner loop sees θ only
    cml_step(params, tasks)
    assert all(torch.equal(p, before[n]) for n, p in phi.items())


def reference_loss(params, tasks, gamma=GAMMA, boil=False, sam_inner=0.0):
    """Independent: per task, K plain gradient steps on θ but its BatchNorm tensors (the outer loop's alone) and,
    for BOIL, but its head, then L^meta + γ L^co on the query set. sam_inner > 0: Sharp-MAML's inner steps, each
    the support gradient at w + ρ ∇/‖∇‖ (‖·‖ over the task's whole adapted θ) applied at w."""
    frozen = ("bn", "head") if boil else ("bn",)
    theta = {n: p for n, p in params.items() if not n.startswith((cml.COLEARNER, *frozen))}
    bn = {n: p for n, p in params.items() if n.startswith(frozen)}
    phi = {n.removeprefix(cml.COLEARNER): p for n, p in params.items() if n.startswith(cml.COLEARNER)}
    total = 0.0
    for t in range(TASKS):
        fast = dict(theta)
        for _ in range(STEPS):
            support = F.cross_entropy(common.conv4_forward({**fast, **bn}, tasks.x_s[t]), tasks.y_s[t])
            grads = torch.autograd.grad(support, list(fast.values()), create_graph=True)
            if sam_inner:
                norm = torch.cat([g.flatten() for g in grads]).norm()
                up = {n: w + sam_inner * g / (norm + 1e-12) for (n, w), g in zip(fast.items(), grads)}
                support = F.cross_entropy(common.conv4_forward({**up, **bn}, tasks.x_s[t]), tasks.y_s[t])
                grads = torch.autograd.grad(support, list(up.values()), create_graph=True)
            fast = {n: w - LR * g for (n, w), g in zip(fast.items(), grads)}
        x, fast = tasks.x_q[t], {**fast, **bn}
        for i in range(BLOCKS):  # the extractor, written out: pool after every block but the last
            x = F.relu(F.batch_norm(F.conv2d(x, fast[f"conv{i}.weight"], fast[f"conv{i}.bias"], padding=1), None, None,
                                    fast[f"bn{i}.weight"], fast[f"bn{i}.bias"], training=True))
            x = F.max_pool2d(x, 2) if i < BLOCKS - 1 else x
        meta = F.linear(F.max_pool2d(x, 2).flatten(1), fast["head.weight"], fast["head.bias"])
        z = x
        for i in range(2):
            z = F.relu(F.batch_norm(F.conv2d(z, phi[f"conv{i}.weight"], phi[f"conv{i}.bias"], padding=1), None, None,
                                    phi[f"bn{i}.weight"], phi[f"bn{i}.bias"], training=True))
        co = F.linear(F.max_pool2d(z, 2).flatten(1), phi["head.weight"], phi["head.bias"])
        total = total + F.cross_entropy(meta, tasks.y_q[t]) + gamma * F.cross_entropy(co, tasks.y_q[t])
    return total / TASKS


@pytest.mark.parametrize("base", ["maml", "boil"])
def test_matches_an_independent_loop(base):
    params, tasks = tiny_params(), tiny_tasks()
    ours = cml_step(params, tasks, base=base)
    loss = reference_loss(params, tasks, boil=base == "boil")
    expected = torch.autograd.grad(loss, list(params.values()))
    assert ours.loss.item() == pytest.approx(loss.item(), rel=1e-12)
    for (name, _), g in zip(params.items(), expected):
        torch.testing.assert_close(ours.grads[name], g, rtol=1e-9, atol=1e-11, msg=name)


def test_gamma_zero_is_plain_boil():
    """BOIL = cml.py --base boil --gamma 0: the meta-gradient of an independent per-task BOIL loop (body-only inner
    steps), φ's zero; the head is the same tensor before and after the inner loop."""
    params, tasks = tiny_params(), tiny_tasks()
    ours = cml_step(params, tasks, gamma=0.0, base="boil")
    loss = reference_loss(params, tasks, gamma=0.0, boil=True)
    expected = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True,
                                                    materialize_grads=True)))
    assert ours.loss.item() == pytest.approx(loss.item(), rel=1e-12)
    for name, g in expected.items():
        torch.testing.assert_close(ours.grads[name], g, rtol=1e-9, atol=1e-11, msg=name)
    assert all(not ours.grads[n].any() for n in params if n.startswith(cml.COLEARNER))
    args = tiny_args(base="boil")
    theta, frozen, lslr, _ = cml.split_params(params, args)
    assert set(theta) == {n for n in params if n.startswith("conv")} and {"head.weight", "head.bias"} <= set(frozen)
    adapted = cml.inner_loop(theta, frozen, lslr, tasks, args, create_graph=False)[-1]
    assert torch.equal(adapted["head.weight"][0], params["head.weight"])  # the head: θ's own, every task
    assert not torch.equal(adapted["conv0.weight"][0], params["conv0.weight"])  # the body moved
    maml = cml_step(params, tasks, gamma=0.0)
    assert not torch.allclose(maml.grads["conv0.weight"], ours.grads["conv0.weight"])  # BOIL is not MAML


MAMLPP = dict(base="mamlpp", per_step_bn=True, msl_epochs=3, clip_grad=0.0)  # MSL on at epoch 0


@pytest.mark.parametrize("base", ["maml", "mamlpp", "boil"])
@pytest.mark.parametrize("part", ["theta", "colearner"])
def test_finite_differences(part, base):
    params, tasks = tiny_params(mamlpp=base == "mamlpp"), tiny_tasks()
    kw = MAMLPP if base == "mamlpp" else dict(base=base)
    grads = cml_step(params, tasks, **kw).grads
    # Direction seed 5: from these weights, seed 3's θ direction meets a max-pool switch in the inner loop within
    # 1e-6 (the adapted weights, hence the loss, jump there; the independent reference_loss jumps the same way).
    gen = torch.Generator().manual_seed(5)
    direction = {n: torch.randn(p.shape, generator=gen, dtype=DTYPE)
                 * (n.startswith(cml.COLEARNER) == (part == "colearner")) for n, p in params.items()}
    eps = 1e-6
    def loss_at(sign):
        with torch.no_grad():
            moved = {n: (p + sign * eps * direction[n]).requires_grad_() for n, p in params.items()}
        return cml_step(moved, tasks, **kw).loss.item()
    numeric = (loss_at(1) - loss_at(-1)) / (2 * eps)
    analytic = sum((grads[n] * direction[n]).sum().item() for n in params)
    assert analytic != 0 and numeric == pytest.approx(analytic, rel=1e-6)


@pytest.mark.parametrize("blocks", [0, 1])
def test_colearner_depth(blocks):
    """--colearner-blocks n (the paper's Conv(n)): n conv blocks in φ, and φ's meta-gradient is still exact."""
    params, tasks = tiny_params(colearner_blocks=blocks), tiny_tasks()
    phi = [n for n in params if n.startswith(cml.COLEARNER)]
    assert len(phi) == 4 * blocks + 2  # conv weight, bias, BN scale, shift per block; the linear layer
    grads = cml_step(params, tasks).grads
    direction = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=DTYPE) * (n in phi)
                 for n, p in params.items()}
    eps = 1e-6
    def loss_at(sign):
        with torch.no_grad():
            moved = {n: (p + sign * eps * direction[n]).requires_grad_() for n, p in params.items()}
        return cml_step(moved, tasks).loss.item()
    numeric = (loss_at(1) - loss_at(-1)) / (2 * eps)
    analytic = sum((grads[n] * direction[n]).sum().item() for n in params)
    assert analytic != 0 and numeric == pytest.approx(analytic, rel=1e-6)


@pytest.mark.parametrize("base", ["maml", "mamlpp"])
def test_vmap_matches_the_loop(base):
    params, tasks, kw = tiny_params(mamlpp=base == "mamlpp"), tiny_tasks(), MAMLPP if base == "mamlpp" else {}
    loop, batched = cml_step(params, tasks, **kw), cml_step(params, tasks, use_vmap=True, **kw)
    torch.testing.assert_close(batched.loss, loop.loss, rtol=1e-12, atol=0)
    for name in params:
        torch.testing.assert_close(batched.grads[name], loop.grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("use_vmap", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("base", ["maml", "mamlpp"])
def test_recomputing_the_inner_steps_gives_the_same_meta_gradient(base, use_vmap):
    params, tasks, kw = tiny_params(mamlpp=base == "mamlpp"), tiny_tasks(), MAMLPP if base == "mamlpp" else {}
    stored, recomputed = cml_step(params, tasks, use_vmap=use_vmap, **kw), \
        cml_step(params, tasks, use_vmap=use_vmap, recompute=True, **kw)
    torch.testing.assert_close(recomputed.loss, stored.loss, rtol=1e-14, atol=0)
    for name in params:
        torch.testing.assert_close(recomputed.grads[name], stored.grads[name], rtol=1e-12, atol=1e-15, msg=name)


def test_logged_statistics():
    params, tasks = tiny_params(), tiny_tasks()
    result = cml_step(params, tasks)
    values = result.metrics
    assert set(values) == set(STATS) and -1 <= values["grad_cos"] <= 1 and values["grad_norm_ratio"] > 0
    assert values["loss_meta"] + GAMMA * values["loss_co"] == pytest.approx(result.loss.item())


@pytest.mark.parametrize("base", ["maml", "mamlpp"])
def test_one_backward_between_logged_iterations_gives_the_same_meta_gradient(base):
    """Off the --grad-stats-every iterations, g_meta + γ g_co in one backward: the two backwards' sum."""
    params, tasks, kw = tiny_params(mamlpp=base == "mamlpp"), tiny_tasks(), MAMLPP if base == "mamlpp" else {}
    apart = cml_step(params, tasks, **kw, grad_stats_every=2)
    joint = cml_step(params, tasks, steps=apart.state["steps"], **kw, grad_stats_every=2)
    assert apart.state == {"epoch": 0, "steps": 1} and joint.state == {"epoch": 0, "steps": 2}
    assert torch.equal(joint.loss, apart.loss)
    for name in params:
        torch.testing.assert_close(joint.grads[name], apart.grads[name], rtol=1e-12, atol=1e-15, msg=name)
    # The gradient agreement on the logged meta-iterations (the 1st, 3rd, ...) only; the losses on every one.
    lslr = {"lslr_mean"} if base == "mamlpp" else set()
    assert set(apart.metrics) == set(STATS) | lslr and set(joint.metrics) == {"loss_meta", "loss_co"} | lslr
    assert joint.metrics["loss_co"] == apart.metrics["loss_co"]


def test_grad_stats_every_zero_never_logs_the_agreement():
    params, tasks = tiny_params(), tiny_tasks()
    values = cml_step(params, tasks, grad_stats_every=0).metrics
    assert "grad_cos" not in values and "grad_norm_ratio" not in values and values["loss_co"] > 0


# mamlpp: MSL on at epochs 0 and 1, first order at epoch 0 only, a clamp that bites.
BASE_FLAGS = {"maml": [], "mamlpp": ["--msl-epochs", "3", "--first-order-epochs", "1", "--clip-grad", "0.05"]}


@pytest.mark.parametrize("base", ["maml", "mamlpp"])
def test_the_files_own_base_is_the_base_file_at_gamma_zero(base):
    """cml.py's own copy of the base (init, meta-gradient, prediction, outer lr, metrics) is the base's, bitwise."""
    module = {"maml": maml_gs, "mamlpp": mamlpp_gs}[base]
    argv = ["--ways", str(WAYS), "--shots", str(SHOTS), "--queries", str(QUERIES), "--filters", str(FILTERS),
            "--epochs", "4"] + BASE_FLAGS[base]
    cpu = torch.device("cpu")
    args_ours = common.parse_args(cml.Args, argv + ["--base", base, "--gamma", "0"])
    args_want = common.parse_args(module.Args, argv + ["--no-gs"])
    ours, state_ours = cml.init_params(args_ours, (1, 28, 28), cpu), cml.init_state(args_ours)
    want, state_want = module.init_params(args_want, (1, 28, 28), cpu), module.init_state(args_want)
    assert list(base_params(ours)) == list(want)
    assert all(torch.equal(ours[n], want[n]) for n in want)
    assert base == "maml" or (args_ours.cosine and args_want.cosine and [cml.cosine_lr(e, args_ours) for e in range(5)]
                              == [module.cosine_lr(e, args_want) for e in range(5)])
    tasks = image_tasks()
    for epoch in range(2):
        got = cml.meta_gradient(ours, state_ours, tasks, epoch, args_ours)
        ref = module.meta_gradient(want, state_want, tasks, epoch, args_want)
        assert float(got.metrics["loss_meta"]) == ref.loss.item() and torch.equal(got.accuracy, ref.accuracy)
        assert all((ref.grads[n] is None and got.grads[n] is None) or torch.equal(got.grads[n], ref.grads[n])
                   for n in want)
        mine = {name: float(value) for name, value in got.metrics.items()}
        assert mine.items() >= {name: float(value) for name, value in ref.metrics.items()}.items()
    assert torch.equal(cml.predict(ours, state_ours, tasks, args_ours),
                       module.predict(want, state_want, tasks, args_want))


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("base", ["maml", "mamlpp", "boil"])
def test_cli_synthetic(tmp_path, base):
    result = cml.main(TINY + ["--base", base, "--out", str(tmp_path / "run")])
    assert result["status"] == "finished" and 0 <= result["test_acc_ensemble"] <= 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["algorithm"] == f"cml_{base}"
    rows = metrics(tmp_path / "run")
    assert len(rows) == 3 and all(float(rows[-1][name]) == float(rows[-1][name]) for name in STATS)  # not NaN
    saved = common.load_checkpoint(tmp_path / "run" / "last.pt")["params"]
    assert {n for n in saved if n.startswith(cml.COLEARNER)} == set(cml.colearner_init(
        {n: p for n, p in saved.items() if not n.startswith(cml.COLEARNER)}, torch.Generator(), 2))


def test_cli_rejects_options_of_the_other_base(tmp_path):
    with pytest.raises(SystemExit):
        cml.main(TINY + ["--base", "maml", "--msl-epochs", "3", "--out", str(tmp_path)])


def test_cli_omniglot_small(tmp_path, shared_data):
    argv = ["--dataset", "omniglot", "--data-root", str(shared_data), "--cache-dir", str(tmp_path / "cache"),
            "--filters", "8", "--tasks", "2", "--ways", "3", "--queries", "2", "--inner-steps", "1", "--epochs", "1",
            "--iters-per-epoch", "2", "--val-tasks", "4", "--test-tasks", "4", "--ensemble", "1", "--quiet",
            "--out", str(tmp_path / "run")]
    result = cml.main(argv)
    assert result["status"] == "finished" and 0 <= result["test_acc_ensemble"] <= 1


@pytest.mark.parametrize("dataset, base", [("cifarfs", "boil"), ("fc100", "maml"), ("vggflower", "boil")])
def test_cli_on_the_papers_other_data_sets(tmp_path, cifar, flowers, dataset, base):
    """CML's other image data sets (fixtures in torchvision's layouts): 32x32 runs train and meta-test."""
    argv = ["--dataset", dataset, "--data-root", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--base", base,
            "--filters", "4", "--tasks", "2", "--ways", "3", "--shots", "1", "--queries", "1", "--inner-steps", "1",
            "--epochs", "1", "--iters-per-epoch", "2", "--val-tasks", "2", "--test-tasks", "2", "--ensemble", "1",
            "--quiet", "--out", str(tmp_path / "run")]
    result = cml.main(argv)
    assert result["status"] == "finished" and 0 <= result["test_acc_ensemble"] <= 1
    saved = common.load_checkpoint(tmp_path / "run" / "last.pt")["params"]
    assert saved["head.weight"].shape == (3, 4 * 2 * 2)  # 32x32 through four pools: 2x2, as CML's wh_size 2


# ---- Sharp-MAML (Abbas et al., arXiv 2206.03996) as a base: SAM in the inner steps and in the outer step ----
SHARP = dict(base="sharpmaml", grad_stats_every=0)
RHO_IN, RHO_OUT = 0.3, 0.2  # radii large enough that the perturbations matter at float64


def test_sharpmaml_with_radii_zero_is_the_maml_base_bitwise():
    params, tasks = tiny_params(), tiny_tasks()
    maml = cml_step(params, tasks, base="maml", grad_stats_every=0)
    sharp = cml_step(params, tasks, sam_inner=0.0, sam_outer=0.0, **SHARP)
    assert torch.equal(sharp.loss, maml.loss) and torch.equal(sharp.accuracy, maml.accuracy)
    assert all(torch.equal(sharp.grads[n], maml.grads[n]) for n in params)


@pytest.mark.parametrize("use_vmap", [False, True], ids=["loop", "vmap"])
def test_sharpmaml_inner_sam_matches_an_independent_per_task_loop(use_vmap):
    params, tasks = tiny_params(), tiny_tasks()
    ours = cml_step(params, tasks, sam_inner=RHO_IN, sam_outer=0.0, use_vmap=use_vmap, **SHARP)
    loss = reference_loss(params, tasks, sam_inner=RHO_IN)
    assert ours.loss.item() == pytest.approx(loss.item(), rel=1e-12)
    assert ours.loss.item() != pytest.approx(reference_loss(params, tasks).item(), rel=1e-6)  # SAM changed it
    for (name, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
        torch.testing.assert_close(ours.grads[name], g, rtol=1e-9, atol=1e-11, msg=name)


def test_sharpmaml_outer_sam_is_the_meta_gradient_at_theta_plus_rho_g_over_its_norm():
    """Independently: g = ∇L(θ) (inner SAM on), ε = ρ g / ‖g‖ over every meta-parameter, the returned gradient is
    ∇L at θ + ε (the inner loop run again from there), the reported loss L(θ)."""
    params, tasks = tiny_params(), tiny_tasks()
    ours = cml_step(params, tasks, sam_inner=RHO_IN, sam_outer=RHO_OUT, **SHARP)
    loss = reference_loss(params, tasks, sam_inner=RHO_IN)
    g = torch.autograd.grad(loss, list(params.values()))
    norm = torch.cat([v.flatten() for v in g]).norm()
    shifted = {n: (p.detach() + RHO_OUT * v / (norm + 1e-12)).requires_grad_() for (n, p), v in zip(params.items(), g)}
    expected = torch.autograd.grad(reference_loss(shifted, tasks, sam_inner=RHO_IN), list(shifted.values()))
    assert ours.loss.item() == pytest.approx(loss.item(), rel=1e-12)
    for (name, _), want in zip(params.items(), expected):
        torch.testing.assert_close(ours.grads[name], want, rtol=1e-9, atol=1e-11, msg=name)
    assert not torch.allclose(torch.cat([ours.grads[n].flatten() for n in params]), torch.cat([v.flatten() for v in g]))


def test_sharpmaml_meta_gradients_match_central_finite_differences():
    """Inner SAM keeps the objective differentiable (ε stays in the graph, as the authors' code): its meta-gradient
    is the loss's; outer SAM's is the loss's at the fixed θ + ε."""
    params, tasks = tiny_params(), tiny_tasks()
    inner = cml_step(params, tasks, sam_inner=RHO_IN, sam_outer=0.0, **SHARP)
    both = cml_step(params, tasks, sam_inner=RHO_IN, sam_outer=RHO_OUT, **SHARP)
    norm = torch.sqrt(sum(g.square().sum() for g in inner.grads.values()))
    epsilon = {n: RHO_OUT * g / (norm + 1e-12) for n, g in inner.grads.items()}
    gen, eps = torch.Generator().manual_seed(5), 1e-6
    for name, p in params.items():
        direction = torch.randn(p.shape, generator=gen, dtype=DTYPE)
        for grads, shift in ((inner.grads, {}), (both.grads, epsilon)):
            def loss_at(sign):
                with torch.no_grad():
                    moved = {n: (q + shift.get(n, 0) + (sign * eps * direction if n == name else 0)).requires_grad_()
                             for n, q in params.items()}
                return cml_step(moved, tasks, sam_inner=RHO_IN, sam_outer=0.0, **SHARP).loss.item()
            numeric = (loss_at(1) - loss_at(-1)) / (2 * eps)
            assert float((grads[name] * direction).sum()) == pytest.approx(numeric, rel=1e-5, abs=1e-9), name


@pytest.mark.parametrize("flags, message", [
    (["--sam-inner", "-0.1"], "--sam-inner must be 0 or positive"),
    (["--sam-outer", "nan"], "--sam-outer must be a finite number"),
    (["--base", "maml", "--sam-outer", "0.05"], "--sam-outer applies to --base sharpmaml only"),
    (["--base", "sharpmaml", "--no-lslr"], "--lslr applies to --base mamlpp only"),
])
def test_bad_sharpmaml_flags_are_messages(capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        cml.main(TINY + (["--base", "sharpmaml"] if "--base" not in flags else []) + flags)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_cli_sharpmaml_runs_and_predicts_with_inner_sam(tmp_path):
    result = cml.main(TINY + ["--base", "sharpmaml", "--out", str(tmp_path / "run")])
    assert result["status"] == "finished" and result["test_acc_ensemble"] is not None

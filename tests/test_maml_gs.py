"""maml_gs.py: meta-gradients against finite differences and an independent per-task loop; equivalences."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import maml_gs

DTYPE = torch.float64
SHAPE = (1, 8, 8)  # tiny images: 2 conv blocks take 8×8 to 2×2
WAYS, SHOTS, QUERIES, TASKS, FILTERS, BLOCKS = 3, 2, 2, 3, 4, 2
STEPS, LR = 2, 0.4  # a large α makes the second-order terms matter


def tiny_params(seed: int = 0, gs: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    theta = common.conv4_init(SHAPE, WAYS, FILTERS, BLOCKS, generator=gen, dtype=DTYPE)
    # Move every tensor off its initial value (BN scale 1, zero biases) so that no term vanishes by symmetry.
    params = {n: p + 0.2 * torch.randn(p.shape, generator=gen, dtype=DTYPE) for n, p in theta.items()}
    if gs:
        params["m"] = 0.5 * torch.randn(STEPS, generator=gen, dtype=DTYPE)
        params["lambda"] = 0.5 * torch.randn(STEPS, generator=gen, dtype=DTYPE)
    return {n: p.requires_grad_() for n, p in params.items()}


def tiny_tasks(seed: int = 1, tasks: int = TASKS) -> common.Tasks:
    gen = torch.Generator().manual_seed(seed)
    def labels(per_class):
        return torch.arange(WAYS).repeat_interleave(per_class).repeat(tasks, 1)
    return common.Tasks(torch.randn(tasks, WAYS * SHOTS, *SHAPE, generator=gen, dtype=DTYPE), labels(SHOTS),
                        torch.randn(tasks, WAYS * QUERIES, *SHAPE, generator=gen, dtype=DTYPE), labels(QUERIES))


def adapted_names(params: dict, adapt_bn: bool = False) -> list[str]:
    """The tensors the inner loop adapts: θ but BatchNorm's scale and shift, unless adapt_bn."""
    return [n for n in params if n not in maml_gs.GS_PARAMS and (adapt_bn or not n.startswith("bn"))]


def stored_ghat(params: dict, seed: int = 2, adapt_bn: bool = False) -> list[dict[str, torch.Tensor]]:
    """A ĝ as a previous meta-iteration would have left it: one unit vector (over the adapted θ) per step."""
    gen = torch.Generator().manual_seed(seed)
    theta = {n: params[n] for n in adapted_names(params, adapt_bn)}
    ghat = []
    for _ in range(STEPS):
        g = {n: torch.randn(p.shape, generator=gen, dtype=DTYPE) for n, p in theta.items()}
        norm = math.sqrt(sum(float(v.square().sum()) for v in g.values()))
        ghat.append({n: v / norm for n, v in g.items()})
    return ghat


def tiny_args(use_vmap=False, **kwargs) -> maml_gs.Args:
    return maml_gs.Args(inner_steps=STEPS, inner_lr=LR, vmap="on" if use_vmap else "off", **kwargs)


def run_step(params, ghat, tasks, first_order=False, use_vmap=False, recompute=False, adapt_bn=False):
    args = tiny_args(use_vmap, first_order=first_order, recompute=recompute, adapt_bn=adapt_bn)
    return maml_gs.meta_gradient(params, {"ghat": ghat}, tasks, 0, args)


def reference_loss(params, ghat, tasks, first_order=False, adapt_bn=False):
    """Algorithm 1 as the paper prints it, independently: loop over steps, then over tasks, flat vectors of the
    adapted tensors (BatchNorm's scale and shift stay θ's unless adapt_bn)."""
    theta = {n: params[n] for n in adapted_names(params, adapt_bn)}
    fixed = {n: p for n, p in params.items() if n not in theta and n not in maml_gs.GS_PARAMS}
    names, shapes = list(theta), [p.shape for p in theta.values()]
    m, lam = params.get("m"), params.get("lambda")

    def unflatten(vector):
        return dict(zip(names, torch.split(vector, [math.prod(s) for s in shapes]))), shapes

    weights = [torch.cat([p.flatten() for p in theta.values()]) for _ in range(tasks.x_s.shape[0])]
    for k in range(STEPS):
        task_grads = []
        for t, w in enumerate(weights):
            parts, _ = unflatten(w)
            net = {**fixed, **{n: v.view(s) for (n, v), s in zip(parts.items(), shapes)}}
            loss = F.cross_entropy(common.conv4_forward(net, tasks.x_s[t]), tasks.y_s[t])
            task_grads.append(torch.autograd.grad(loss, w, create_graph=not first_order)[0])
        if m is not None:
            total = sum(task_grads)
            g_k = total / total.norm()
            if ghat is None:
                shared = g_k
            else:
                old = torch.cat([ghat[k][n].flatten() for n in names])
                shared = torch.sigmoid(m[k]) * g_k + (1 - torch.sigmoid(m[k])) * old
        for t in range(len(weights)):
            delta = task_grads[t]
            if m is not None:
                delta = torch.sigmoid(lam[k]) * shared + (1 - torch.sigmoid(lam[k])) * task_grads[t]
            weights[t] = weights[t] - LR * delta
    losses = []
    for t, w in enumerate(weights):
        parts, _ = unflatten(w)
        net = {**fixed, **{n: v.view(s) for (n, v), s in zip(parts.items(), shapes)}}
        losses.append(F.cross_entropy(common.conv4_forward(net, tasks.x_q[t]), tasks.y_q[t]))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("adapt_bn", [False, True], ids=["bn-outer-only", "adapt-bn"])
@pytest.mark.parametrize("gs", [True, False])
@pytest.mark.parametrize("later", [False, True], ids=["first-iteration", "later-iteration"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("use_vmap", [False, True], ids=["loop", "vmap"])
def test_matches_independent_per_task_loop(gs, later, first_order, use_vmap, adapt_bn):
    params, tasks = tiny_params(gs=gs), tiny_tasks()
    ghat = stored_ghat(params, adapt_bn=adapt_bn) if (later and gs) else None
    result = run_step(params, ghat, tasks, first_order, use_vmap, adapt_bn=adapt_bn)
    ref_loss = reference_loss(params, ghat, tasks, first_order, adapt_bn)
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()), allow_unused=True)
    torch.testing.assert_close(result.loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
    for (name, got), want in zip(result.grads.items(), ref_grads):
        if want is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("gs", [True, False])
@pytest.mark.parametrize("later", [False, True], ids=["first-iteration", "later-iteration"])
@pytest.mark.parametrize("use_vmap", [False, True], ids=["loop", "vmap"])
def test_recomputing_the_inner_steps_gives_the_same_meta_gradient(gs, later, use_vmap):
    params, tasks = tiny_params(gs=gs), tiny_tasks()
    ghat = stored_ghat(params) if (later and gs) else None
    stored = run_step(params, ghat, tasks, use_vmap=use_vmap)
    recomputed = run_step(params, ghat, tasks, use_vmap=use_vmap, recompute=True)
    torch.testing.assert_close(recomputed.loss, stored.loss, rtol=1e-14, atol=0)
    for name, g in stored.grads.items():
        if g is None:
            assert recomputed.grads[name] is None
        else:
            torch.testing.assert_close(recomputed.grads[name], g, rtol=1e-12, atol=1e-15, msg=name)
    if gs:
        for old, new in zip(stored.state["ghat"], recomputed.state["ghat"]):
            assert all(torch.equal(old[n], new[n]) for n in old)


@pytest.mark.parametrize("later", [False, True], ids=["first-iteration", "later-iteration"])
def test_meta_gradient_matches_central_finite_differences(later):
    params, tasks = tiny_params(), tiny_tasks()
    ghat = stored_ghat(params) if later else None
    grads = run_step(params, ghat, tasks).grads
    if not later:
        assert grads["m"] is None  # ĝ = g on the first iteration: m takes no part (Eq. 2)
    gen, eps = torch.Generator().manual_seed(3), 1e-6

    def loss_at(name, direction):
        with torch.no_grad():
            shifted = {n: (p + direction if n == name else p).detach().requires_grad_() for n, p in params.items()}
        return float(run_step(shifted, ghat, tasks).loss)

    checked = 0
    for name, p in params.items():
        if grads[name] is None:
            continue
        # Every element of m and λ; two random directions for each θ tensor.
        directions = ([torch.zeros_like(p).view(-1).index_fill_(0, torch.tensor([i]), 1.0).view(p.shape)
                       for i in range(p.numel())] if name in maml_gs.GS_PARAMS else
                      [torch.randn(p.shape, generator=gen, dtype=DTYPE) for _ in range(2)])
        for v in directions:
            numeric = (loss_at(name, eps * v) - loss_at(name, -eps * v)) / (2 * eps)
            analytic = float((grads[name] * v).sum())
            assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-8), name
            checked += 1
    assert checked >= 2 * (len(params) - 2) + 2 * STEPS - (0 if later else STEPS)


@pytest.mark.parametrize("adapt_bn", [False, True])
def test_batchnorm_is_adapted_in_the_inner_loop_only_with_adapt_bn(adapt_bn):
    params, tasks = tiny_params(gs=False), tiny_tasks()
    theta, frozen, _, _ = maml_gs.split_params(params, tiny_args(adapt_bn=adapt_bn))
    fast, _ = maml_gs.inner_loop(theta, frozen, tasks, None, tiny_args(adapt_bn=adapt_bn), create_graph=False)
    for name, p in params.items():  # fast: (tasks, ...) per tensor
        assert torch.equal(fast[name], p.expand(TASKS, *p.shape)) == (name.startswith("bn") and not adapt_bn), name
    ghat = run_step(tiny_params(), None, tasks, adapt_bn=adapt_bn).state["ghat"]
    assert all(any(n.startswith("bn") for n in ghat_k) == adapt_bn for ghat_k in ghat)  # ĝ spans what adapts


def test_first_order_maml_is_the_mean_query_gradient_at_the_adapted_weights():
    params, tasks = tiny_params(gs=False), tiny_tasks()
    result = run_step(params, None, tasks, first_order=True)
    theta, frozen, _, _ = maml_gs.split_params(params, tiny_args())
    fast, _ = maml_gs.inner_loop(theta, frozen, tasks, None, tiny_args(), create_graph=False)
    adapted = {n: w.detach().requires_grad_() for n, w in fast.items()}  # (tasks, ...) leaves
    loss = F.cross_entropy(common.forward_tasks(common.conv4_forward, adapted, tasks.x_q, False).flatten(0, 1),
                           tasks.y_q.flatten())
    for name, g in zip(adapted, torch.autograd.grad(loss, list(adapted.values()))):
        torch.testing.assert_close(result.grads[name], g.sum(0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("later", [False, True])
def test_zero_gate_is_exactly_maml(later):
    params, tasks = tiny_params(gs=True), tiny_tasks()
    with torch.no_grad():
        params["lambda"].fill_(-math.inf)  # σ(λ) = 0: Δ = 0·ĝ + 1·∇L_t = ∇L_t, bit for bit
    maml = {n: p for n, p in params.items() if n not in maml_gs.GS_PARAMS}
    ghat = stored_ghat(params) if later else None
    theta, frozen, m, lam = maml_gs.split_params(params, tiny_args())
    gs_fast, _ = maml_gs.inner_loop(theta, frozen, tasks, maml_gs.Sharing(m, lam, ghat, update=True), tiny_args(),
                                    create_graph=True)
    maml_fast, _ = maml_gs.inner_loop(*maml_gs.split_params(maml, tiny_args())[:2], tasks, None, tiny_args(),
                                      create_graph=True)
    assert all(torch.equal(gs_fast[n], maml_fast[n]) for n in maml)
    # The meta-gradient, bit for bit: the same operations on the same values (x·0 + y·1 = y).
    for use_vmap in (False, True):
        gs_result, maml_result = run_step(params, ghat, tasks, use_vmap=use_vmap), run_step(maml, None, tasks,
                                                                                            use_vmap=use_vmap)
        assert torch.equal(gs_result.loss, maml_result.loss)
        assert all(torch.equal(gs_result.grads[n], maml_result.grads[n]) for n in maml)
    assert torch.equal(maml_gs.predict(params, {"ghat": ghat}, tasks, tiny_args()),
                       maml_gs.predict(maml, {"ghat": None}, tasks, tiny_args()))


def test_no_gs_has_no_m_lambda_or_ghat():
    args = maml_gs.Args(gs=False, ways=WAYS, filters=FILTERS)
    params, state = maml_gs.init_params(args, (1, 28, 28), torch.device("cpu")), maml_gs.init_state(args)
    assert not set(maml_gs.GS_PARAMS) & set(params)
    tasks = common.Tasks(*(t.float() if t.is_floating_point() else t for t in tiny_tasks()))
    tasks = tasks._replace(x_s=F.interpolate(tasks.x_s.flatten(0, 1), size=28).view(TASKS, -1, 1, 28, 28),
                           x_q=F.interpolate(tasks.x_q.flatten(0, 1), size=28).view(TASKS, -1, 1, 28, 28))
    result = maml_gs.meta_gradient(params, state, tasks, 0, args)
    assert result.state == {"ghat": None} and result.metrics == {}


def test_gs_stores_normalised_g_on_first_iteration_and_predict_never_changes_it():
    params, tasks = tiny_params(), tiny_tasks()
    state = run_step(params, None, tasks).state
    for ghat_k in state["ghat"]:  # Eq. 2: ĝ_k = g_k, a unit vector over the whole of θ
        assert math.isclose(math.sqrt(sum(float(v.square().sum()) for v in ghat_k.values())), 1.0, rel_tol=1e-12)
        assert all(not v.requires_grad for v in ghat_k.values())
    before = [{n: v.clone() for n, v in ghat_k.items()} for ghat_k in state["ghat"]]
    first = maml_gs.predict(params, state, tiny_tasks(seed=5), tiny_args())
    second = maml_gs.predict(params, state, tiny_tasks(seed=5), tiny_args())
    assert torch.equal(first, second)
    for old, new in zip(before, state["ghat"]):
        assert all(torch.equal(old[n], new[n]) for n in old)
    # ... and the stored ĝ is really used: another ĝ gives other predictions.
    other = maml_gs.predict(params, {"ghat": stored_ghat(params)}, tiny_tasks(seed=5), tiny_args())
    assert not torch.allclose(first, other)


def test_predict_is_the_same_for_vmap_and_loop_and_for_any_task_batching():
    params, tasks = tiny_params(), tiny_tasks(tasks=4)
    state = {"ghat": stored_ghat(params)}
    whole = maml_gs.predict(params, state, tasks, tiny_args())
    torch.testing.assert_close(maml_gs.predict(params, state, tasks, tiny_args(use_vmap=True)), whole,
                               rtol=1e-12, atol=1e-12)
    halves = [maml_gs.predict(params, state, common.Tasks(*(t[i:i + 2] for t in tasks)), tiny_args())
              for i in (0, 2)]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-12, atol=1e-12)

"""ResNet-12 (--backbone resnet12): fmu2's network, and the meta-gradients of maml_gs.py and lwdgh.py through it."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import lwdgh
import maml_gs

DTYPE = torch.float64
SHAPE = (1, 16, 16)  # the smallest images four poolings take: 16×16 -> 1×1
WAYS, SHOTS, QUERIES, TASKS, WIDTH = 3, 2, 2, 2, 2  # channels 2-4-8-16
STEPS, LR = 2, 0.1  # large enough for the second-order terms to matter, small enough for ε = 1e-6 (ResNet curves)


def tiny_params(seed: int = 0, gs: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    theta = common.resnet12_init(SHAPE, WAYS, WIDTH, generator=gen, dtype=DTYPE)
    # Off the initial values (BN scale 1, shift 0), so that no term vanishes by symmetry.
    params = {n: p + 0.2 * torch.randn(p.shape, generator=gen, dtype=DTYPE) for n, p in theta.items()}
    if gs:
        params.update({n: 0.5 * torch.randn(STEPS, generator=gen, dtype=DTYPE) for n in maml_gs.GS_PARAMS})
    return {n: p.requires_grad_() for n, p in params.items()}


def tiny_tasks(seed: int = 1) -> common.Tasks:
    gen = torch.Generator().manual_seed(seed)
    def labels(per_class):
        return torch.arange(WAYS).repeat_interleave(per_class).repeat(TASKS, 1)
    return common.Tasks(torch.randn(TASKS, WAYS * SHOTS, *SHAPE, generator=gen, dtype=DTYPE), labels(SHOTS),
                        torch.randn(TASKS, WAYS * QUERIES, *SHAPE, generator=gen, dtype=DTYPE), labels(QUERIES))


class Block(torch.nn.Module):
    """fmu2's residual block, written with torch.nn modules (BatchNorm in training mode: batch statistics)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.convs = torch.nn.ModuleList([torch.nn.Conv2d(c, c_out, 3, padding=1, bias=False) for c in (c_in, c_out,
                                                                                                            c_out)])
        self.bns = torch.nn.ModuleList([torch.nn.BatchNorm2d(c_out) for _ in range(3)])
        self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 1, bias=False), torch.nn.BatchNorm2d(c_out))
        self.relu, self.pool = torch.nn.LeakyReLU(0.1), torch.nn.MaxPool2d(2)

    def forward(self, x):
        out = self.relu(self.bns[0](self.convs[0](x)))
        out = self.relu(self.bns[1](self.convs[1](out)))
        out = self.bns[2](self.convs[2](out))
        return self.pool(self.relu(out + self.shortcut(x)))


def test_resnet12_forward_is_fmu2s_network_written_with_modules():
    params = tiny_params()
    widths = [SHAPE[0]] + [WIDTH * 2 ** i for i in range(4)]
    blocks = torch.nn.Sequential(*[Block(a, b) for a, b in zip(widths, widths[1:])]).to(DTYPE)
    head = torch.nn.Linear(widths[-1], WAYS).to(DTYPE)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            for j in range(3):
                block.convs[j].weight.copy_(params[f"conv{i}.{j}.weight"])
                block.bns[j].weight.copy_(params[f"bn{i}.{j}.weight"])
                block.bns[j].bias.copy_(params[f"bn{i}.{j}.bias"])
            block.shortcut[0].weight.copy_(params[f"conv{i}.shortcut.weight"])
            block.shortcut[1].weight.copy_(params[f"bn{i}.shortcut.weight"])
            block.shortcut[1].bias.copy_(params[f"bn{i}.shortcut.bias"])
        head.weight.copy_(params["head.weight"])
        head.bias.copy_(params["head.bias"])
    x = tiny_tasks().x_q[0]
    want = head(torch.nn.AdaptiveAvgPool2d(1)(blocks(x)).flatten(1))
    torch.testing.assert_close(common.resnet12_forward(params, x), want, rtol=1e-12, atol=1e-12)


def test_resnet12_at_fmu2s_width_has_about_8_million_parameters_in_its_shapes():
    params = common.resnet12_init((3, 84, 84), 5, 64)
    convs = sum(9 * a * b + 2 * 9 * b * b + a * b for a, b in [(3, 64), (64, 128), (128, 256), (256, 512)])
    batch_norms = 4 * 2 * (64 + 128 + 256 + 512)
    assert sum(p.numel() for p in params.values()) == convs + batch_norms + 512 * 5 + 5 == 7_999_365
    assert params["conv3.2.weight"].shape == (512, 512, 3, 3) and params["conv0.shortcut.weight"].shape == (64, 3, 1, 1)
    assert params["head.weight"].shape == (5, 512) and all(params[f"bn{i}.{j}.weight"].eq(1).all() for i in range(4)
                                                             for j in (0, 1, 2, "shortcut"))
    std = params["conv3.2.weight"].std().item()  # Kaiming-normal, fan_out = 512·9, gain √2 (leaky_relu, slope 0)
    assert std == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.01)
    logits = common.resnet12_forward(params, torch.randn(2, 3, 84, 84))
    assert logits.shape == (2, 5)


def args_for(module, use_vmap=False, **kwargs):
    return module.Args(backbone="resnet12", resnet_width=WIDTH, ways=WAYS, inner_steps=STEPS, inner_lr=LR,
                       vmap="on" if use_vmap else "off", **kwargs)


def plain_maml_loss(params, tasks):
    """Second-order MAML written plainly on resnet12_forward, one task at a time; BatchNorm the outer loop's."""
    bn = {n: p for n, p in params.items() if n.startswith("bn")}
    losses = []
    for t in range(TASKS):
        fast = {n: p for n, p in params.items() if n not in bn}
        for _ in range(STEPS):
            loss = F.cross_entropy(common.resnet12_forward({**fast, **bn}, tasks.x_s[t]), tasks.y_s[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: w - LR * g for (n, w), g in zip(fast.items(), grads)}
        losses.append(F.cross_entropy(common.resnet12_forward({**fast, **bn}, tasks.x_q[t]), tasks.y_q[t]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("use_vmap", [False, True], ids=["loop", "vmap"])
def test_maml_on_resnet12_matches_a_plain_per_task_loop(use_vmap):
    params, tasks = tiny_params(), tiny_tasks()
    result = maml_gs.meta_gradient(params, {"ghat": None}, tasks, 0, args_for(maml_gs, use_vmap, gs=False))
    want = plain_maml_loss(params, tasks)
    torch.testing.assert_close(result.loss, want.detach(), rtol=1e-12, atol=1e-12)
    for (name, got), expected in zip(result.grads.items(), torch.autograd.grad(want, list(params.values()))):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12, msg=name)


def central_difference(loss_at, direction, eps=1e-6) -> float:
    return (loss_at(eps * direction) - loss_at(-eps * direction)) / (2 * eps)


def test_maml_gs_on_resnet12_matches_central_finite_differences():
    """Gradient sharing on a later iteration (a stored ĝ): θ along a random direction per tensor, every m and λ."""
    params, tasks = tiny_params(gs=True), tiny_tasks()
    args = args_for(maml_gs, gs=True)
    state = {"ghat": maml_gs.meta_gradient(tiny_params(seed=5, gs=True), {"ghat": None}, tasks, 0, args).state["ghat"]}
    grads = maml_gs.meta_gradient(params, state, tasks, 0, args).grads
    value_only = args_for(maml_gs, gs=True, first_order=True)  # the same loss, without the second-order graph
    gen = torch.Generator().manual_seed(3)
    for name, p in params.items():
        def loss_at(delta):
            shifted = {n: (q + delta if n == name else q).detach().requires_grad_() for n, q in params.items()}
            return float(maml_gs.meta_gradient(shifted, state, tasks, 0, value_only).loss)
        directions = (torch.eye(STEPS, dtype=DTYPE) if name in maml_gs.GS_PARAMS
                      else [torch.randn(p.shape, generator=gen, dtype=DTYPE)])
        for v in directions:
            assert float((grads[name] * v).sum()) == pytest.approx(central_difference(loss_at, v), rel=1e-5,
                                                                    abs=1e-8), name


def test_lwdgh_per_task_meta_gradients_on_resnet12_match_central_finite_differences():
    params, tasks = tiny_params(), tiny_tasks()
    args, value_only = args_for(lwdgh), args_for(lwdgh, first_order=True)  # value_only: the same loss, cheaper
    task_grads, _, _ = lwdgh.task_gradients(params, tasks, args)
    gen = torch.Generator().manual_seed(3)
    for i, (name, p) in enumerate(params.items()):
        direction, t = torch.randn(p.shape, generator=gen, dtype=DTYPE), i % TASKS  # each tensor: one of the tasks
        one = common.Tasks(*(x[t:t + 1] for x in tasks))
        def loss_at(delta):
            shifted = {n: (q + delta if n == name else q).detach().requires_grad_() for n, q in params.items()}
            return float(lwdgh.task_gradients(shifted, one, value_only)[1])
        assert float((task_grads[name][t] * direction).sum()) == pytest.approx(
            central_difference(loss_at, direction), rel=1e-5, abs=1e-8), (name, t)


def test_files_that_stay_conv4_refuse_resnet12(capsys):
    import cml
    import mamlpp_gs
    for module in (cml, mamlpp_gs):
        with pytest.raises(SystemExit) as exit_info:
            common.parse_args(module.Args, ["--backbone", "resnet12"])
        assert exit_info.value.code == 2 and "--backbone resnet12: this method runs on conv4" in capsys.readouterr().err
    import metasgd_gs
    for module in (maml_gs, metasgd_gs, lwdgh):
        assert common.parse_args(module.Args, ["--backbone", "resnet12"]).backbone == "resnet12"

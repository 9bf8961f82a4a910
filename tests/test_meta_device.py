"""Device placement, checked without a GPU: every algorithm file's meta-iteration (twice, the second from the first's
state) and its prediction run on PyTorch's `meta` device, whose tensors compute nothing and mix with no CPU tensor
(but a 0-dim scalar). A tensor made without `device=` (on the CPU) where a run on CUDA would need it on the GPU fails
here as it would there. Every file and flag combination a user can run on the GPU's default path (vmap over tasks),
and each file's first on the loop path too."""
import importlib

import pytest
import torch

import common

META = torch.device("meta")
TASKS, STEPS, FILTERS = 2, 2, 4
IMAGES = ["--dataset", "synthetic", "--synthetic-shape", "3,16,16", "--ways", "3", "--shots", "1", "--queries", "2",
          "--filters", str(FILTERS)]
SINUSOID = ["--dataset", "sinusoid", "--shots", "3", "--queries", "2"]
RESNET = ["--backbone", "resnet12", "--resnet-width", "2"]
CASES = {  # file: the flag combinations
    "maml_gs": [["--no-gs"], ["--gs"], ["--gs", "--gs-source", "batch"], ["--gs", "--gs-source", "history"],
                ["--gs", "--recompute"], ["--gs", "--first-order"], ["--gs", "--adapt-bn"], ["--gs", *RESNET],
                ["--gs", *SINUSOID], ["--no-gs", *SINUSOID]],
    "metasgd_gs": [["--no-gs"], ["--gs"], ["--gs", "--gs-source", "history"], ["--gs", "--recompute"],
                   ["--gs", "--no-learn-alpha"], ["--gs", *RESNET], ["--gs", *SINUSOID]],
    "mamlpp_gs": [["--no-gs"], ["--gs"], ["--gs", "--gs-source", "batch"], ["--gs", "--recompute"],
                  ["--gs", "--no-per-step-bn", "--no-lslr"], ["--gs", "--first-order-epochs", "5"],
                  ["--gs", "--clip-grad", "1"]],
    "cml": [["--base", "maml"], ["--base", "boil"], ["--base", "mamlpp"], ["--base", "sharpmaml"],
            ["--base", "maml", "--recompute"], ["--base", "maml", "--colearner-blocks", "0"],
            ["--base", "sharpmaml", *SINUSOID], ["--base", "maml", *SINUSOID]],
    "lwdgh": [[], ["--no-ee"], ["--recompute"], ["--clip-grad", "1"], RESNET, SINUSOID],
}


def meta_tasks(args: common.Args, shape: tuple[int, ...]) -> common.Tasks:
    """A task batch of the run's shapes on the meta device: what load_data would give on CUDA."""
    if args.dataset in common.REGRESSION:
        return common.Tasks(*(torch.empty(TASKS, n, 1, device=META) for n in (args.shots, args.shots, args.queries,
                                                                              args.queries)))
    def labels(n):
        return torch.zeros(TASKS, args.ways * n, dtype=torch.long, device=META)
    return common.Tasks(torch.empty(TASKS, args.ways * args.shots, *shape, device=META), labels(args.shots),
                        torch.empty(TASKS, args.ways * args.queries, *shape, device=META), labels(args.queries))


@pytest.mark.parametrize("program, flags, vmap", [(p, f, "on") for p, cases in CASES.items() for f in cases]
                         + [(p, cases[0], "off") for p, cases in CASES.items()],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_meta_iteration_and_a_prediction_stay_on_the_parameters_device(program, flags, vmap):
    module = importlib.import_module(program)
    argv = (flags if "--dataset" in flags else IMAGES + flags) + ["--tasks", str(TASKS), "--inner-steps", str(STEPS),
                                                                 "--vmap", vmap]
    args = common.parse_args(module.Args, argv)
    shape = common.SINUSOID_SHAPE if args.dataset in common.REGRESSION else (3, 16, 16)
    params = module.init_params(args, shape, META)
    assert all(p.device == META for p in params.values())
    state, tasks = module.init_state(args), meta_tasks(args, shape)
    for _ in range(2):  # the second from the first's state (a stored ĝ, a generator, a step count)
        result = module.meta_gradient(params, state, tasks, 0, args)
        assert result.loss.device == META and result.accuracy.device == META
        assert all(g.device == META for g in result.grads.values() if g is not None)
        assert all(v.device == META for v in result.metrics.values() if isinstance(v, torch.Tensor))
        state.update(result.state)
    prediction = module.predict(params, state, tasks, args)
    assert prediction.device == META and prediction.shape[:2] == tasks.y_q.shape[:2]


def test_a_tensor_made_on_the_cpu_fails_here():
    """The check itself: a CPU tensor (not a 0-dim scalar) mixed into meta tensors raises."""
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.empty(3, device=META) + torch.ones(3)

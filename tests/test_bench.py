"""tools/bench.py times each algorithm file's default path: it must compute what the plain loop computes."""
import sys
from pathlib import Path

import pytest
import torch

import common

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench  # noqa: E402

WAYS, SHOTS, QUERIES, TASKS, FILTERS, STEPS, LR = 3, 2, 2, 3, 4, 2, 0.4
SHAPE = (1, 16, 16)  # the smallest image Conv4's four poolings accept
DTYPE = torch.float64


def tiny_tasks(seed: int = 1) -> common.Tasks:
    gen = torch.Generator().manual_seed(seed)
    def labels(per_class):
        return torch.arange(WAYS).repeat_interleave(per_class).repeat(TASKS, 1)
    return common.Tasks(torch.randn(TASKS, WAYS * SHOTS, *SHAPE, generator=gen, dtype=DTYPE), labels(SHOTS),
                        torch.randn(TASKS, WAYS * QUERIES, *SHAPE, generator=gen, dtype=DTYPE), labels(QUERIES))


def tiny_step(label: str, tasks: common.Tasks):
    return bench.algorithm_step(label, tasks, SHAPE, WAYS, torch.device("cpu"), filters=FILTERS,
                                inner_steps=STEPS, inner_lr=LR, dtype=DTYPE)


@pytest.mark.parametrize("flags", ["", "--vmap on", "--recompute"])
def test_the_benchmarked_maml_path_gives_the_plain_loops_gradients(flags):
    """The timed path (maml_gs.py --no-gs as its command line builds it; '' is the default) = the plain loop."""
    tasks = tiny_tasks()
    algorithm, step = tiny_step(f"maml_gs.py --no-gs {flags}", tasks)
    reference = {name: p.detach().clone().requires_grad_() for name, p in algorithm.params.items()}
    bench.plain_loop(reference, tasks, inner_steps=STEPS, inner_lr=LR)
    result = step()
    assert set(result.grads) == set(reference)
    for name, p in reference.items():
        torch.testing.assert_close(result.grads[name], p.grad, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("label", bench.OTHER_FILES + ("maml_gs.py --gs",))
def test_every_benchmarked_algorithm_file_runs_and_carries_its_state(label):
    """Each line of the bench runs the file's meta-iteration twice (state carried) with finite gradients."""
    _, step = tiny_step(label, tiny_tasks())
    for _ in range(2):
        result = step()
        assert torch.isfinite(result.loss)
        assert all(torch.isfinite(g).all() for g in result.grads.values() if g is not None)

"""The GPU paths compute what the CPU loop path computes.

On CUDA every algorithm file's default (--vmap auto) runs the tasks of a batch through one vmap-ed forward
and samples its tasks in device memory; the operations are the CPU's (F.conv2d, F.batch_norm, F.relu,
F.max_pool2d). The CUDA cases skip without a GPU;
run them where one is (`pytest tests/test_device.py`). The CPU cases run the same comparison on the CPU's
vmap path, so that every check here also runs, and can fail, on a machine without a GPU.
"""
import importlib
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import common

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
WAYS, SHOTS, QUERIES, TASKS, FILTERS, STEPS, LR = 3, 2, 2, 3, 4, 2, 0.4
SHAPE = (1, 16, 16)  # the smallest image Conv4's four poolings accept
DTYPE = torch.float64
# Each file as the bench times it, with the flags whose code differs from one path to the other.
LABELS = ("maml_gs.py --no-gs", "maml_gs.py --gs", "maml_gs.py --gs --recompute", "metasgd_gs.py --gs",
          "mamlpp_gs.py --gs", "cml.py", "lwdgh.py")
# (device, flags) against the CPU loop path: the vmap path on the CPU; on CUDA the default and the loop.
PATHS = [("cpu", "--vmap on"), pytest.param("cuda", "", marks=NO_CUDA),
         pytest.param("cuda", "--vmap off", marks=NO_CUDA)]
META_ITERATIONS = 2  # the second starts from the state the first left (ĝ, LWDGH's sums, CML's counter)


def tiny_tasks(device: str) -> common.Tasks:
    gen = torch.Generator().manual_seed(1)
    def labels(per_class):
        return torch.arange(WAYS).repeat_interleave(per_class).repeat(TASKS, 1)
    tasks = common.Tasks(torch.randn(TASKS, WAYS * SHOTS, *SHAPE, generator=gen, dtype=DTYPE), labels(SHOTS),
                         torch.randn(TASKS, WAYS * QUERIES, *SHAPE, generator=gen, dtype=DTYPE), labels(QUERIES))
    return common.Tasks(*(t.to(device) for t in tasks))


def build(label: str, device: str):
    """(algorithm, one-meta-iteration function, tasks) of the file as its command line builds it on device."""
    tasks = tiny_tasks(device)
    file, *flags = label.split()
    module = importlib.import_module(file.removesuffix(".py"))
    argv = flags + ["--ways", str(WAYS), "--shots", str(SHOTS), "--queries", str(QUERIES), "--tasks", str(TASKS),
                    "--filters", str(FILTERS), "--inner-steps", str(STEPS), "--inner-lr", str(LR)]
    args = common.for_device(common.parse_args(module.Args, argv + ["--device", device]), torch.device(device))
    params = module.init_params(args, SHAPE, torch.device(device))
    algorithm = SimpleNamespace(module=module, args=args, state=module.init_state(args),
                                params={n: p.detach().to(DTYPE).requires_grad_() for n, p in params.items()})
    state = algorithm.state

    def step() -> common.StepResult:
        nonlocal state
        result = module.meta_gradient(algorithm.params, state, tasks, 0, args)
        state = result.state
        return result
    return algorithm, step, tasks


@pytest.mark.parametrize("device, flags", PATHS)
@pytest.mark.parametrize("label", LABELS)
def test_the_device_path_gives_the_cpu_loop_paths_meta_gradients_and_predictions(label, device, flags):
    loop_algorithm, loop_step, loop_tasks = build(f"{label} --vmap off", "cpu")
    algorithm, step, tasks = build(f"{label} {flags}", device)
    for name, p in loop_algorithm.params.items():  # the same θ (and m, λ, ...) from the seed on every device
        torch.testing.assert_close(algorithm.params[name].detach().cpu(), p.detach(), rtol=0, atol=0, msg=name)
    got = algorithm.module.predict(algorithm.params, algorithm.state, tasks, algorithm.args)
    want = loop_algorithm.module.predict(loop_algorithm.params, loop_algorithm.state, loop_tasks, loop_algorithm.args)
    torch.testing.assert_close(got.detach().cpu(), want.detach(), rtol=1e-9, atol=1e-12)
    for iteration in range(META_ITERATIONS):
        expected, got = loop_step(), step()
        torch.testing.assert_close(got.loss.cpu(), expected.loss, rtol=1e-9, atol=1e-12)
        assert {n for n, g in got.grads.items() if g is not None} == {
            n for n, g in expected.grads.items() if g is not None}
        for name, g in expected.grads.items():
            if g is not None:
                torch.testing.assert_close(got.grads[name].cpu(), g, rtol=1e-8, atol=1e-11,
                                           msg=f"{name}, meta-iteration {iteration}")


def test_the_default_on_cuda_is_the_vmap_path():
    args = common.Args()
    assert common.for_device(args, torch.device("cuda")).vmap == "on"
    assert common.for_device(args, torch.device("cpu")).vmap == "off"
    assert common.for_device(common.Args(vmap="on"), torch.device("cpu")).vmap == "on"
    mlp = common.Args(dataset="sinusoid", backbone="mlp", ways=1)  # tiny layers: one batched call on a CPU too
    assert common.for_device(mlp, torch.device("cpu")).vmap == "on"
    assert common.for_device(replace(mlp, vmap="off"), torch.device("cpu")).vmap == "off"


def synthetic_split(device: str) -> common.Split:
    return common.load_split("synthetic", "val", synthetic_shape=(1, 16, 16), synthetic_per_class=10,
                             verbose=False).to(device)


@NO_CUDA
def test_evaluation_tasks_are_the_same_on_every_device():
    """EvalTasks draws its indices on the CPU: every method is evaluated on the same tasks on any device."""
    on_cpu = common.EvalTasks(synthetic_split("cpu"), WAYS, SHOTS, QUERIES, num_tasks=7, seed=3)
    on_cuda = common.EvalTasks(synthetic_split("cuda"), WAYS, SHOTS, QUERIES, num_tasks=7, seed=3)
    for a, b in zip(on_cpu.batches(4), on_cuda.batches(4), strict=True):
        for x, y in zip(a, b):
            assert y.device.type == "cuda"
            torch.testing.assert_close(y.cpu(), x, rtol=0, atol=0)


@NO_CUDA
def test_training_tasks_are_sampled_in_device_memory():
    split = synthetic_split("cuda")
    tasks = common.TaskSampler(split, WAYS, SHOTS, QUERIES, TASKS, seed=0).sample()
    assert all(t.device.type == "cuda" for t in tasks)
    assert tasks.x_s.shape == (TASKS, WAYS * SHOTS, *split.image_shape)
    assert tasks.x_q.shape == (TASKS, WAYS * QUERIES, *split.image_shape)
    for y, per_class in ((tasks.y_s, SHOTS), (tasks.y_q, QUERIES)):
        assert torch.equal(y.cpu(), torch.arange(WAYS).repeat_interleave(per_class).repeat(TASKS, 1))


class Crash(BaseException):
    """Stands for kill -9: the process dies with no chance to save anything."""


@NO_CUDA
@pytest.mark.parametrize("file", ["maml_gs", "metasgd_gs", "mamlpp_gs", "cml", "lwdgh"])
def test_a_run_on_cuda_killed_and_resumed_ends_as_an_uninterrupted_one(tmp_path, monkeypatch, file):
    """End to end on the GPU: training, validation, the ensemble's test, checkpoints holding CUDA tensors and
    the CUDA task generator's state, and a resume. CUDA's convolutions are not bitwise deterministic (no
    cudnn.deterministic here), so the numbers are compared to a tolerance."""
    module = __import__(file)
    argv = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--filters", "8", "--tasks", "2", "--ways", "3",
            "--queries", "2", "--inner-steps", "2", "--epochs", "2", "--iters-per-epoch", "2", "--val-tasks", "4",
            "--test-tasks", "4", "--ensemble", "2", "--quiet", "--device", "cuda"]
    reference = module.main(argv + ["--out", str(tmp_path / "ref")])
    original, calls = common.TaskSampler.sample, []

    def sample(self):  # killed in epoch 2, after epoch 1's checkpoint
        calls.append(1)
        if len(calls) == 3:
            raise Crash()
        return original(self)
    monkeypatch.setattr(common.TaskSampler, "sample", sample)
    with pytest.raises(Crash):
        module.main(argv + ["--out", str(tmp_path / "run")])
    monkeypatch.undo()
    resumed = module.main(["--resume", str(tmp_path / "run"), "--quiet"])
    assert resumed["status"] == reference["status"] == "finished" and resumed["epochs_run"] == 2
    floats = {key for key, value in reference.items() if isinstance(value, float)}  # accuracies, intervals
    assert {k: v for k, v in resumed.items() if k not in floats} == {
        k: v for k, v in reference.items() if k not in floats}
    assert {k: resumed[k] for k in floats} == pytest.approx({k: reference[k] for k in floats}, abs=1e-4)

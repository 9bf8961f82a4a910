"""One device-to-host read per meta-iteration in every algorithm file.

On a GPU every read of a tensor's value into Python (.item(), float(), bool(), .tolist(), .cpu()) makes the host
wait until the device has finished all the work queued before it. A meta-iteration reads once: whether its loss
and meta-gradient are finite, together with the loss for the progress line; every other number is summed on
the device and read once per epoch. Counted here on the CPU, which runs the same code: the reads of a run with
more meta-iterations per epoch, minus those of one with fewer, over the difference in meta-iterations.
"""
import importlib
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

READS = ("tolist", "cpu", "numpy")  # Tensor methods that copy values to the host; .item(), float(), int() and
# bool() go through the operator _local_scalar_dense, seen by the dispatch mode below
HOST_CODE = ("/torch/optim/",)  # Adam's step counters: CPU tensors on every device, read by the optimizer
TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--filters", "4", "--tasks", "2", "--ways", "3",
        "--queries", "2", "--inner-steps", "2", "--epochs", "1", "--val-tasks", "3", "--test-tasks", "3",
        "--ensemble", "1", "--quiet"]
FEW, MANY = 2, 5  # meta-iterations per epoch of the two runs compared
LABELS = ["maml_gs --gs", "maml_gs --no-gs", "metasgd_gs --gs", "mamlpp_gs --gs", "mamlpp_gs --no-gs",
          "cml --base mamlpp --grad-stats-every 1", "cml --base boil", "lwdgh --p-min 0.5 --p-max 0.5",
          "lwdgh --backbone resnet12 --resnet-width 2"]


def in_host_code() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if any(part in frame.f_code.co_filename for part in HOST_CODE):
            return True
        frame = frame.f_back
    return False


class HostReads(TorchDispatchMode):
    """Counts the reads of tensor values into Python, but those of numbers that live on the host on every
    device: Adam's step counters and numbers drawn by a CPU torch.Generator (LWDGH's explore draw)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.host_drawn: dict[int, torch.Tensor] = {}  # data_ptr -> a number drawn by a CPU generator (kept alive)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        generator = kwargs.get("generator")
        if generator is not None and generator.device.type == "cpu" and isinstance(out, torch.Tensor) \
                and out.dim() == 0:
            self.host_drawn[out.data_ptr()] = out
        if func is torch.ops.aten._local_scalar_dense.default and args[0].data_ptr() not in self.host_drawn \
                and not in_host_code():
            self.count += 1
        return out


def reads(module, flags: list[str], iterations: int, out, monkeypatch) -> int:
    mode = HostReads()
    with monkeypatch.context() as patch:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, **kwargs):
                if not in_host_code():
                    mode.count += 1
                return _original(self, *args, **kwargs)
            patch.setattr(torch.Tensor, name, counted)
        with mode:
            module.main(TINY + flags + ["--iters-per-epoch", str(iterations), "--out", str(out)])
    return mode.count


@pytest.mark.parametrize("label", LABELS)
def test_one_host_read_per_meta_iteration(label, tmp_path, monkeypatch):
    file, *flags = label.split()
    module = importlib.import_module(file)
    few = reads(module, flags, FEW, tmp_path / "few", monkeypatch)
    many = reads(module, flags, MANY, tmp_path / "many", monkeypatch)
    assert many - few == MANY - FEW, f"{(many - few) / (MANY - FEW):.2f} host reads per meta-iteration"


def test_the_counter_sees_every_kind_of_read():
    mode = HostReads()
    with mode:
        x = torch.ones(3)
        x.sum().item(), float(x[0]), int(x[1]), bool(x[2])
        torch.rand((), generator=torch.Generator().manual_seed(0)).item()  # a host draw: not counted
    assert mode.count == 4

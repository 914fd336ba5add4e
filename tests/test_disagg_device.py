"""Disaggregated training on a device (``TrainSpec.device``, ``[jobs.training] device``): the
setting is validated naming its field, ``cuda`` without a GPU per worker fails before any
worker starts, and the engine and the links put what they compute with on the spec's device.

Only the CPU runs here (no GPU on these machines, none in CI): the CUDA/NCCL path itself is
not exercised; these tests check what can be checked without it — that the device chosen
reaches every place a tensor is made or moved.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from agent.configfile import ConfigError
from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.models.data import digits_splits
from cloud_trainer.models.zoo import get_pair
from cloud_trainer.trainer_config import TrainingSection, load_trainer_config
from cloud_trainer.training.disagg import DeviceUnavailable, TrainSpec, train_disaggregated
from cloud_trainer.training.disagg import launch as launch_mod
from cloud_trainer.training.disagg.candidate import train_from_labels
from cloud_trainer.training.disagg.comm import Links
from cloud_trainer.training.disagg.engine import Data, train_rank
from cloud_trainer.training.disagg.placement import check_device, worker_device
from cloud_trainer.training.disagg.spec import RankStats
from cloud_trainer.training.disagg.synthetic import SyntheticGradient

MINIMAL = """
[trainer]
signing_key_file = "keys/k.key"
state_dir = "state"
[models.digits]
[[jobs]]
id = "j"
model = "digits"
interval_s = 60
[jobs.training]
"""


# Like the workers: tiny tensors on a shared two-core machine (train.training_context).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the setting


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_config_takes_cpu_or_cuda_for_the_from_labels_modes(tmp_path: Path,
                                                                 device: str) -> None:
    path = tmp_path / "trainer.toml"
    path.write_text(MINIMAL + f'mode = "synthetic-gradients"\nworkers = 2\ndevice = "{device}"\n')
    assert load_trainer_config(path).jobs[0].training.device == device
    assert TrainingSection().device == "cpu"  # the default: today's behaviour
    spec = TrainSpec(device=device)  # type: ignore[arg-type]
    assert spec.backend == {"cpu": "gloo", "cuda": "nccl"}[device]
    assert TrainSpec.from_dict(spec.to_dict()) == spec  # it travels in the job file
    old = spec.to_dict()
    del old["device"]
    assert TrainSpec.from_dict(old).device == "cpu"  # a job written before the setting


@pytest.mark.parametrize(("lines", "message"), [
    ('mode = "pipelined"\ndevice = "gpu"\n', "jobs.0.training.device"),
    ('mode = "pipelined"\ndevice = "cuda:1"\n', "jobs.0.training.device"),
    ('device = "cuda"\n', "device = 'cuda': only for mode = backprop, pipelined"),
    # M block replay where it means nothing
    ('mode = "pipelined"\nm_replay = 8\n', "only for mode = synthetic-gradients"),
    ('mode = "synthetic-gradients"\nm_replay_steps = 2\n', "needs m_replay >= 1"),
    ('mode = "synthetic-gradients"\nm_replay = -1\n', "jobs.0.training.m_replay"),
])
def test_a_wrong_training_setting_is_refused_naming_the_field(tmp_path: Path, lines: str,
                                                              message: str) -> None:
    path = tmp_path / "trainer.toml"
    path.write_text(MINIMAL + lines)
    with pytest.raises(ConfigError) as err:
        load_trainer_config(path)
    assert message in str(err.value) and "trainer.toml" in str(err.value)


def test_a_spec_refuses_an_unknown_device() -> None:
    with pytest.raises(ValueError, match="device 'gpu': choose from cpu, cuda"):
        TrainSpec(device="gpu")  # type: ignore[arg-type]


def test_a_worker_uses_the_gpu_of_its_local_rank() -> None:
    assert worker_device(TrainSpec(device="cuda"), 3) == torch.device("cuda", 3)
    assert worker_device(TrainSpec(), 3) == torch.device("cpu")


# -- failing early


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting a worker, or writing its job, fails the test."""
    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a worker was started")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(launch_mod, "write_job", refuse)
    monkeypatch.setattr(launch_mod, "train_local", refuse)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without a GPU, also where the tests run on one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.usefixtures("no_launch", "no_gpu")
def test_cuda_without_a_gpu_fails_before_any_worker_starts(workers: int) -> None:
    s = digits_splits()
    spec = TrainSpec(mode="pipelined", workers=workers, steps=2, batch_size=8, device="cuda",
                     partition=(1, 3)[:workers])
    with pytest.raises(DeviceUnavailable) as err:
        train_disaggregated(get_pair("digits", 0).student, s.x_train[:32], s.y_train[:32], spec)
    assert 'device = "cuda" but torch' in str(err.value)
    assert 'set [training] device = "cpu"' in str(err.value)
    assert isinstance(err.value, KnetTrainerError) and isinstance(err.value, RuntimeError)


@pytest.mark.usefixtures("no_launch", "no_gpu")
def test_a_jobs_cuda_setting_reaches_the_check() -> None:
    s = digits_splits()
    t = TrainingSection(mode="synthetic-gradients", workers=2, device="cuda", epochs=1)
    with pytest.raises(DeviceUnavailable):
        train_from_labels(get_pair("digits", 0).student, s.x_train[:32], s.y_train[:32], 0, t)


@pytest.mark.usefixtures("no_launch")
def test_fewer_gpus_than_workers_on_a_node_fails_and_says_what_to_change(
        monkeypatch: pytest.MonkeyPatch) -> None:
    s, model = digits_splits(), get_pair("digits", 0).student
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    spec = TrainSpec(mode="synthetic-gradients", workers=3, steps=2, batch_size=8,
                     device="cuda", partition=(1, 2, 3))
    with pytest.raises(DeviceUnavailable) as err:
        train_disaggregated(model, s.x_train[:32], s.y_train[:32], spec)
    msg = str(err.value)
    assert "NCCL cannot run two ranks on one GPU" in msg
    assert "3 workers on this node, 2 GPU(s) visible (CUDA_VISIBLE_DEVICES=0,1)" in msg
    assert "workers to at most 2" in msg
    check_device(TrainSpec(device="cuda", workers=4), 2)  # 4 workers on 2 nodes: 2 GPUs do
    check_device(TrainSpec(workers=8), 8)  # the CPU needs no GPU


# -- placement


class _Work:
    def wait(self) -> None:
        pass

    def is_completed(self) -> bool:
        return True


@pytest.fixture
def rank1_of_3(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """A stand-in for ``torch.distributed`` as rank 1 of 3: whatever comes from rank ``r`` is
    filled with ``r``, a blocking receive from rank 2 only after an activation went up to it
    (a gradient answers an activation); returns the list of what is sent."""
    sent: list[torch.Tensor] = []
    up = threading.Semaphore(0)

    def fill(buf: torch.Tensor, src: int, group: Any = None) -> _Work:
        buf.fill_(src)
        return _Work()

    def recv(buf: torch.Tensor, src: int, group: Any = None) -> _Work:
        assert src != 2 or up.acquire(timeout=30)
        return fill(buf, src, group)

    def isend(t: torch.Tensor, dst: int, group: Any = None) -> _Work:
        sent.append(t)
        if dst == 2:
            up.release()
        return _Work()

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(dist, "new_group", lambda ranks: tuple(ranks))
    monkeypatch.setattr(dist, "irecv", fill)
    monkeypatch.setattr(dist, "recv", recv)
    monkeypatch.setattr(dist, "isend", isend)
    return sent


class Moves:
    """Records every ``Tensor.to`` / ``Module.to`` call, and the device of every
    ``torch.empty`` of the links (their receive buffers)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tensors: list[tuple[int, tuple[int, ...], torch.dtype, torch.device]] = []
        self.modules: list[tuple[nn.Module, torch.device]] = []
        self.empties: list[torch.device | str | None] = []
        tensor_to, module_to, empty = torch.Tensor.to, nn.Module.to, torch.empty

        def target(*args: Any, **kwargs: Any) -> torch.device:
            kwargs.pop("copy", None)
            return torch._C._nn._parse_to(*args, **kwargs)[0]

        def spy_tensor(t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self.tensors.append((id(t), tuple(t.shape), t.dtype, target(*args, **kwargs)))
            return tensor_to(t, *args, **kwargs)

        def spy_module(m: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
            self.modules.append((m, target(*args, **kwargs)))
            return module_to(m, *args, **kwargs)

        def spy_empty(*args: Any, **kwargs: Any) -> torch.Tensor:
            if sys._getframe(1).f_globals["__name__"] == "cloud_trainer.training.disagg.comm":
                self.empties.append(kwargs.get("device"))
            return empty(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", spy_tensor)
        monkeypatch.setattr(nn.Module, "to", spy_module)
        monkeypatch.setattr(torch, "empty", spy_empty)


def test_a_middle_rank_moves_its_blocks_m_blocks_and_labels_to_the_spec_device(
        monkeypatch: pytest.MonkeyPatch, rank1_of_3: list[torch.Tensor]) -> None:
    s = digits_splits()
    model = get_pair("digits", 0).student
    spec = TrainSpec(mode="synthetic-gradients", workers=3, steps=3, batch_size=8,
                     boundaries=(1, 2, 3))
    device = worker_device(spec)
    data = Data(None, s.y_train[:64], spec, device)
    params = {id(p) for i in (2, 3) for p in model.block(i).parameters()}
    moves = Moves(monkeypatch)
    stats = RankStats(1, (2, 3))
    links = Links(stats, 2, device)
    result = train_rank(model, 2, 3, data, spec, links, stats)
    links.flush()
    moved = {type(m).__name__ if isinstance(m, SyntheticGradient) else m
             for m, d in moves.modules if d == device}
    # its own blocks and the M blocks of its boundaries 2 and 3; blocks 1 and 4 are not its own
    assert {model.block(2), model.block(3), "SyntheticGradient"} == moved
    assert sum(isinstance(m, SyntheticGradient) for m, _ in moves.modules) == 2
    # every parameter went through .to(device) (Module.to moves each one)
    assert params <= {i for i, _, _, d in moves.tensors if d == device}
    # every step's labels were moved: (batch,) int64 to the device
    assert [d for _, shape, dtype, d in moves.tensors
            if shape == (8,) and dtype == torch.int64] == [device] * 3
    # an activation and a gradient received per step, on the device; the same sent
    assert len(moves.empties) == 6 and all(d is device for d in moves.empties)
    assert len(rank1_of_3) == 6 and all(t.device == device for t in rank1_of_3)
    assert stats.backward_waits == 0 and len(result.cosines[3]) == 3
    # what goes back is a CPU copy, not the live weights
    for i in (2, 3):
        for k, v in model.block(i).state_dict().items():
            assert result.states[i][k].device.type == "cpu"
            assert result.states[i][k].data_ptr() != v.data_ptr()


def test_the_first_stage_moves_every_input_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    s = digits_splits()
    spec = TrainSpec(mode="pipelined", workers=1, steps=2, batch_size=8, shift=1)
    device = worker_device(spec)
    data = Data(s.x_train[:64], s.y_train[:64], spec, device)
    moves = Moves(monkeypatch)
    train_rank(get_pair("digits", 0).student, 1, 4, data, spec, None, RankStats(0, (1, 4)))
    shape = (8, *s.x_train.shape[1:])
    assert [d for _, sh, dtype, d in moves.tensors
            if sh == shape and dtype == torch.float32] == [device] * 2


def test_every_receive_buffer_of_the_links_is_made_on_their_device(
        monkeypatch: pytest.MonkeyPatch, rank1_of_3: list[torch.Tensor]) -> None:
    """Activations from rank 0, gradients from rank 2, pipelined and on the receiver
    thread."""
    sent = rank1_of_3
    device = worker_device(TrainSpec())
    moves = Moves(monkeypatch)
    links = Links(RankStats(1, (2, 2)), 2, device)
    links.expect_forward(2)
    got = [links.recv_forward((4, 3)), links.recv_forward((4, 3)),
           links.recv_backward((4, 5))]
    links.send_forward(got[0] * 2)
    links.send_forward(got[1])
    links.start_gradient_receiver(2, (4, 5))
    got += [g for _, g in links.drain_gradients(2)]
    links.send_backward(got[2])
    links.flush()
    assert [float(g.mean()) for g in got] == [0, 0, 2, 2, 2]
    assert len(moves.empties) == 5 and all(d is device for d in moves.empties)
    assert all(t.device == device for t in got + sent)
    # the default: the CPU, as before
    assert Links(RankStats(1, (2, 2)), 2).device == torch.device("cpu")
    np.testing.assert_array_equal(sent[0].numpy(), np.zeros((4, 3)))

"""Point-to-point links between neighbouring workers (``torch.distributed``, gloo or NCCL).

Activations go forward on the default group; gradients go backward on one two-rank group
per boundary, so the two directions never share a gloo context and a thread may receive
gradients while the main thread sends activations.

Why a receiver thread for the synthetic-gradient mode: a gloo ``irecv`` only completes in
``wait()`` (``Work.is_completed()`` stays false until someone waits), so polling it cannot
tell whether a gradient has arrived. The thread waits instead of the training loop, and the
loop takes whatever has arrived from a queue without blocking, which is the whole point of
decoupling: the worker is never locked on the backward pass of the blocks above it.

On GPUs (NCCL) every buffer lives on the worker's device, and a wait means the transfer has
*completed* (polled with ``Work.is_completed()``), not only that the CUDA stream will wait
for it as NCCL's ``Work.wait()`` alone would: so a gradient the receiver thread hands over
has arrived, back-pressure bounds the sends in flight, and the measured waits are real on
either backend.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

import torch
import torch.distributed as dist

from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.training.disagg.spec import RankStats

log = logging.getLogger(__name__)


class PeerLost(KnetTrainerError, RuntimeError):
    """A neighbouring worker went away in the middle of a run (its link failed)."""


class Links:
    """One rank's links to rank-1 (``prev``) and rank+1 (``next``); counts what it sends.

    Must be built on every rank in the same order (``dist.new_group`` is collective).
    ``window`` bounds the sends in flight per direction: the sender waits on its oldest
    send beyond it, which bounds memory and how far a worker runs ahead of its neighbour.
    Receive buffers are allocated on ``device`` (the tensors sent must be on it too).
    """

    def __init__(self, stats: RankStats, window: int,
                 device: torch.device | None = None) -> None:
        self.stats = stats
        self.device = torch.device("cpu") if device is None else device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.prev = self.rank - 1 if self.rank > 0 else None
        self.next = self.rank + 1 if self.rank < self.world - 1 else None
        # gradients from rank k+1 to rank k travel on backward[k]
        self._backward = [dist.new_group([k, k + 1]) for k in range(self.world - 1)] \
            if self.world > 1 else []
        self._window = window
        self._sends: dict[str, deque[tuple[dist.Work, torch.Tensor]]] = {
            "forward": deque(), "backward": deque()}
        self._posted: deque[tuple[dist.Work, torch.Tensor]] = deque()
        self._forward_left = 0  # activations still to post a receive for
        self._arrived: queue.Queue[tuple[int, torch.Tensor] | BaseException] = queue.Queue()
        self._receiver: threading.Thread | None = None
        self._received = 0

    # -- forward: activations from prev, to next
    def send_forward(self, h: torch.Tensor) -> None:
        self._send("forward", h, self.next, None)

    def expect_forward(self, count: int) -> None:
        """``count`` activations will come from ``prev`` in this run."""
        self._forward_left = count

    def recv_forward(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The next activation from ``prev`` (blocking: forward locking is kept); the next
        one's receive is posted at once so its transfer overlaps this step's compute."""
        if not self._posted:
            self._post(shape)
        work, buf = self._posted.popleft()
        t0 = time.perf_counter()
        self._wait(work, "activation")
        self.stats.forward_wait_s += time.perf_counter() - t0
        self._post(shape)
        return buf

    def _post(self, shape: tuple[int, ...]) -> None:
        if self._forward_left > 0:
            buf = torch.empty(shape, device=self.device)
            self._posted.append((dist.irecv(buf, self.prev), buf))
            self._forward_left -= 1

    # -- backward: gradients from next, to prev
    def send_backward(self, g: torch.Tensor) -> None:
        assert self.prev is not None
        self._send("backward", g, self.prev, self._backward[self.prev])

    def recv_backward(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Blocking receive of a gradient (pipelined backprop: the block waits for it)."""
        assert self.next is not None
        buf = torch.empty(shape, device=self.device)
        t0 = time.perf_counter()
        self._wait(dist.irecv(buf, self.next, group=self._backward[self.rank]), "gradient")
        self.stats.backward_wait_s += time.perf_counter() - t0
        self.stats.backward_waits += 1
        return buf

    def start_gradient_receiver(self, count: int, shape: tuple[int, ...]) -> None:
        """Receive ``count`` gradients from ``next`` on a thread (synthetic gradients)."""
        assert self.next is not None
        group = self._backward[self.rank]

        def receive() -> None:
            try:
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)  # the current GPU is per thread
                for i in range(count):
                    buf = torch.empty(shape, device=self.device)
                    if self.device.type == "cuda":
                        _completed(dist.irecv(buf, self.next, group=group))
                    else:
                        dist.recv(buf, self.next, group=group)
                    self._arrived.put((i, buf))
            except BaseException as exc:  # the peer died: tell the training loop
                self._arrived.put(exc)

        self._receiver = threading.Thread(target=receive, name="gradients", daemon=True)
        self._receiver.start()

    def arrived_gradients(self) -> list[tuple[int, torch.Tensor]]:
        """Gradients that have arrived, without waiting for any."""
        out = []
        while True:
            try:
                item = self._arrived.get_nowait()
            except queue.Empty:
                return out
            out.append(self._checked(item))
            self._received += 1

    def drain_gradients(self, count: int) -> list[tuple[int, torch.Tensor]]:
        """After the training loop: wait for the rest of the ``count`` gradients."""
        out = self.arrived_gradients()
        while self._received < count:
            out.append(self._checked(self._arrived.get()))
            self._received += 1
            self.stats.drained_after_loop += 1
        return out

    def _checked(self, item: tuple[int, torch.Tensor] | BaseException) -> tuple[int, torch.Tensor]:
        if isinstance(item, BaseException):
            raise PeerLost(f"rank {self.rank}: gradient link from rank {self.next} failed: "
                           f"{item}") from item
        return item

    # -- common
    def _send(self, direction: str, t: torch.Tensor, dst: int | None,
              group: dist.ProcessGroup | None) -> None:
        assert dst is not None
        t = t.detach().contiguous()
        pending = self._sends[direction]
        pending.append((dist.isend(t, dst, group=group), t))
        self.stats.bytes_sent += t.numel() * t.element_size()
        self.stats.messages_sent += 1
        while len(pending) > self._window:
            work, _ = pending.popleft()
            t0 = time.perf_counter()
            self._wait(work, f"{direction} send")
            self.stats.send_wait_s += time.perf_counter() - t0

    def _wait(self, work: dist.Work, what: str) -> None:
        try:
            if self.device.type == "cuda":
                _completed(work)
            else:
                work.wait()
        except RuntimeError as exc:
            raise PeerLost(f"rank {self.rank}: {what} link failed: {exc}") from exc

    def flush(self) -> None:
        """Wait for every send of this rank to complete."""
        for pending in self._sends.values():
            while pending:
                self._wait(pending.popleft()[0], "send")
        if self._receiver is not None:
            self._receiver.join()


def _completed(work: dist.Work) -> None:
    """Wait until an NCCL operation has completed on the GPU (its ``wait()`` only orders the
    current CUDA stream after it); raises its error. NCCL's watchdog ends a rank whose
    operation outlives the process group's timeout."""
    delay = 1e-5
    while not work.is_completed():
        time.sleep(delay)
        delay = min(2 * delay, 1e-3)
    work.wait()

"""Run ``knet-agent`` with every thread under cProfile on its own CPU clock.

cProfile alone profiles only the thread that enables it, and the agent's work runs in its
stage, link and paho threads; py-spy's GIL and idle detection proved unreliable on this
Python (it counted threads blocked in ``Condition.wait`` as running). Here each thread gets
its own ``cProfile.Profile(time.thread_time)``: time is the thread's CPU time, so waiting
for a lock, the GIL or the network costs nothing, and the merged ``pstats`` file says which
functions the CPU went to. cProfile's per-call overhead inflates Python-heavy parts against
native ones (onnxruntime, LZ4, SQLite), so read the table as shares, not speeds.

Usage: ``python -m bench.threadprof OUT.pstats -- agent-cli-args...``
"""

from __future__ import annotations

import atexit
import cProfile
import pstats
import sys
import threading
import time
from pathlib import Path

_PROFILES: list[cProfile.Profile] = []


def _patch_threads() -> None:
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        prof = cProfile.Profile(time.thread_time)
        _PROFILES.append(prof)
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()

    threading.Thread.run = run  # type: ignore[method-assign]


def _dump(out: Path, main: cProfile.Profile) -> None:
    main.disable()
    for prof in _PROFILES:
        prof.disable()  # threads still running at exit (daemons): what they did so far
    stats = pstats.Stats(main)
    for prof in _PROFILES:
        try:
            stats.add(prof)
        except TypeError:  # a profile that recorded nothing
            continue
    stats.dump_stats(str(out))


def main(argv: list[str]) -> int:
    out, args = Path(argv[0]), argv[argv.index("--") + 1:]
    _patch_threads()
    prof = cProfile.Profile(time.thread_time)
    atexit.register(_dump, out, prof)
    from agent.cli import main as agent_main

    prof.enable()
    return int(agent_main(args) or 0)


# (label, file suffix, function name): inclusive CPU of the entry points of each part.
KEYS: tuple[tuple[str, str, str], ...] = (
    ("inference stage (all)", "agent/service.py", "_infer"),
    ("  onnxruntime call", "agent/infer/runtime.py", "run"),
    ("encode stage (all)", "agent/service.py", "_encode_batch"),
    ("  codec encode (quantise, LZ4)", "agent/wire/codec/registry.py", "encode"),
    ("  envelope pack (v1)", "agent/wire/envelope.py", "pack"),
    ("  batcher add", "agent/mqtt/batcher.py", "add"),
    ("  batch stacking", "agent/mqtt/batcher.py", "stacked"),
    ("  batch sample table", "agent/wire/envelope.py", "table"),
    ("publish stage (all)", "agent/service.py", "_publish"),
    ("  spool insert (group commit)", "agent/mqtt/spool.py", "append_many"),
    ("link drain thread (all)", "agent/mqtt/link.py", "_drain_loop"),
    ("  PUBACK handling", "agent/mqtt/link.py", "_process_acks"),
    ("  spool delete acked", "agent/mqtt/spool.py", "ack_many"),
    ("  spool read + paho publish()", "agent/mqtt/link.py", "_fill_window"),
    ("paho network thread (all)", "paho/mqtt/client.py", "_thread_main"),
    ("pipeline queue put/get", "agent/infer/pipeline.py", "put"),
    ("pipeline queue put/get", "agent/infer/pipeline.py", "get_many"),
    ("supervisor (main thread)", "agent/service.py", "_supervise"),
)


def key_functions(path: Path) -> dict[str, float]:
    """Inclusive CPU seconds of each entry point in ``KEYS`` (summed over threads)."""
    st = pstats.Stats(str(path))
    out: dict[str, float] = dict.fromkeys([k for k, _f, _n in KEYS], 0.0)
    out["total CPU (every thread)"] = st.total_tt  # type: ignore[attr-defined]
    for (file, _line, name), (_cc, _nc, _tt, cumtime, _callers) in \
            st.stats.items():  # type: ignore[attr-defined]
        for label, suffix, fn in KEYS:
            if file.endswith(suffix) and name == fn:
                out[label] += cumtime
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

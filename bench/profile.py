"""Where the agent's time goes: py-spy samples of the real `knet-agent` process, summed by
part of the uplink path.

py-spy (a sampling profiler, no instrumentation) sees every thread, which cProfile does not
(it profiles only the thread that enabled it, and the agent's work is in its stage, link and
paho threads). With ``--gil`` only the samples of the thread holding the GIL count, so the
table reads as "Python time per message": onnxruntime, LZ4 and SQLite's own work release the
GIL and show up only around their calls.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

# Checked in order against every frame of a stack; the first part that matches any frame
# takes the sample. Specific parts come before the stage that calls them.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("start-up (imports, sessions, archive check)", ("importlib", "Agent.__init__",
                                                     ".prepare (", "_bootstrap (<frozen")),
    ("codec encode (quantise, LZ4)", ("agent/wire/codec/",)),
    ("batch stacking", ("Batcher.",)),
    ("envelope pack", ("Envelope.pack", "BatchEnvelope.pack")),
    ("spool insert (group commit)", ("Spool.append_many",)),
    ("spool read for sending", ("Spool.peek",)),
    ("spool delete acked", ("Spool.ack_many",)),
    ("paho publish()", ("Client.publish (",)),
    ("paho network loop (send, PUBACK)", ("paho/mqtt/",)),
    ("link drain and ack bookkeeping", ("agent/mqtt/link.py",)),
    ("inference (onnxruntime call)", ("BoundChain.run", "BlockRunner.run")),
    ("inference stage, other Python", ("Agent._infer",)),
    ("encode stage, other Python", ("Agent._encode",)),
    ("publish stage, other Python", ("Agent._publish",)),
    ("pipeline hand-offs", ("agent/infer/pipeline.py",)),
    ("source (npz read, checks)", ("agent/infer/sources.py",)),
    ("supervisor, metrics, stats", ("Agent._supervise", "agent/metrics.py")),
)


def py_spy() -> str | None:
    """The py-spy executable (on PATH or beside this interpreter), or None."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def summarize(raw: Path) -> Counter[str]:
    """Samples per part from py-spy's ``--format raw`` (collapsed stacks, one per line)."""
    parts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        parts[_part(frames)] += int(count)
    return parts


def _part(frames: list[str]) -> str:
    for name, keys in PARTS:
        if any(key in frame for frame in frames for key in keys):
            return name
    return "other"

"""What the agent needs from Python > 3.8, for the Pythons of JetPack 5 (3.8) and 6 (3.10).

The device side must run on the interpreter the vendor image ships, because NVIDIA's GPU
onnxruntime wheels exist only for it; the trainer side may use anything newer.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

if sys.version_info >= (3, 9):
    from typing import Annotated  # novermin
else:  # a pydantic dependency, so always installed with the agent
    from typing_extensions import Annotated

__all__ = ["Annotated", "zip_strict"]


def zip_strict(*iterables: Iterable[Any]) -> Iterator[tuple[Any, ...]]:
    """``zip(..., strict=True)`` (3.10): a length mismatch is a bug, never a silent cut."""
    sentinel = object()
    iterators = [iter(it) for it in iterables]
    while True:
        items = [next(it, sentinel) for it in iterators]
        done = [item is sentinel for item in items]
        if all(done):
            return
        if any(done):
            raise ValueError(f"zip_strict: argument {done.index(True) + 1} is shorter than "
                             f"argument {done.index(False) + 1}")
        yield tuple(items)


def _release(dist: str) -> tuple[int, ...] | None:
    from importlib import metadata

    try:
        text = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    parts = []
    for p in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_onnxruntime_numpy() -> None:
    """Refuse onnxruntime < 1.19 next to numpy 2 before importing it: such a build was
    compiled against numpy 1's ABI and crashes the process (SIGSEGV) instead of raising.
    pip cannot catch the mix (onnxruntime declares no numpy cap); the constraints files
    pin numpy<2 for those versions (constraints/*.txt)."""
    ort = next((v for v in map(_release, ("onnxruntime", "onnxruntime-gpu")) if v), None)
    numpy = _release("numpy")
    if ort is not None and numpy is not None and ort < (1, 19) and numpy >= (2,):
        raise ImportError(
            f"onnxruntime {'.'.join(map(str, ort))} was built for numpy 1 but numpy "
            f"{'.'.join(map(str, numpy))} is installed; install 'numpy<2' (see "
            f"constraints/ in the knet source)")


def drop_out_messages(client: Any) -> list[Any]:
    """paho-mqtt's ``Client.drop_out_messages()`` (2.2+, Python >= 3.9). On Python 3.8 the
    newest paho is 2.1, which lacks it: the same few lines, on the same private fields."""
    if hasattr(client, "drop_out_messages"):
        return list(client.drop_out_messages())
    with client._out_message_mutex:
        dropped = list(client._out_messages.values())
        client._out_messages.clear()
    return dropped

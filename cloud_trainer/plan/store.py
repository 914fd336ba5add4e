"""Where the trainer keeps block benchmark records: one JSON file per device and model.

The latest record of a (device, model, role) wins; older ones are kept under ``history/``
so a re-plan can be compared with what the planner knew before. The trainer's service
subscribes to ``Topics.all_devices("bench")`` and hands each message to ``ingest``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.infer.blockbench import MAX_RECORD_BYTES, BenchRecord, BenchRecordError
from agent.wire.topics import TopicError, Topics

log = logging.getLogger(__name__)


class BenchStore:
    """A directory of ``BenchRecord`` JSON files (safe names only: ids are validated)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        (self.directory / "history").mkdir(parents=True, exist_ok=True)
        self.rejected = 0

    def _name(self, record: BenchRecord) -> str:
        return f"{record.device}--{record.model_id}--{record.role}.json"

    def add(self, record: BenchRecord) -> Path:
        """Store ``record`` as the latest for its device/model/role; returns its path."""
        path = self.directory / self._name(record)
        if path.exists():
            stamp = record.created_at.strftime("%Y%m%dT%H%M%S%f")
            path.replace(self.directory / "history" / f"{path.stem}--{stamp}.json")
        return record.dump(path)

    def ingest(self, topics: Topics, topic: str, payload: bytes) -> BenchRecord | None:
        """A message from ``{fleet}/{device}/bench``: validated, tied to the sending device.

        A malformed record, or one claiming another device than its topic, is counted and
        logged, never stored (a device could otherwise overwrite another's figures).
        """
        try:
            device, leaf = topics.parse_device_topic(topic)
            if leaf != "bench":
                raise BenchRecordError(f"{topic} is not a bench topic")
            record = BenchRecord.from_json(payload, max_bytes=MAX_RECORD_BYTES)
            if record.device != device:
                raise BenchRecordError(f"record names device {record.device!r} but came on "
                                       f"{device!r}'s topic")
        except (BenchRecordError, TopicError) as exc:
            self.rejected += 1
            log.warning("bench record rejected (%d so far): %s", self.rejected, exc)
            return None
        self.add(record)
        log.info("bench record stored: %s %s (%s)", record.device, record.model_id,
                 record.profile)
        return record

    def records(self, model_id: str | None = None) -> list[BenchRecord]:
        """The latest record of every device (for ``model_id`` when given)."""
        out = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                rec = BenchRecord.load(path)
            except BenchRecordError as exc:
                log.warning("skipping %s", exc)
                continue
            if model_id is None or rec.model_id == model_id:
                out.append(rec)
        return out

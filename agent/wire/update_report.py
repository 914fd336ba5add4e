"""What a device says about an update, on its ``update`` topic (QoS 1, not retained).

The trainer's staged rollout reads these to decide whether a canary group succeeded, and
the fleet view shows the last one per device. One JSON object per outcome::

    {"device": "pi4-kitchen", "session": 7, "model_id": "digits", "version": 3,
     "from_version": 2, "status": "applied", "reason": null, "detail": "",
     "time": 1764614400.0, "bytes": 12345, "seconds": 1.8}

``status`` is the stage reached; ``reason`` is set for ``rejected`` and ``rolled_back``
and is one of :data:`RejectReason` (machine-readable; ``detail`` is for people).
"""

from __future__ import annotations

import builtins
import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent import safejson
from agent.errors import KnetAgentError

Status = Literal["downloading", "downloaded", "applied", "rejected", "rolled_back"]

RejectReason = Literal[
    # the manifest itself (agent.update.update_manifest.UpdateRejected reasons)
    "malformed", "unsigned", "bad_signature", "unknown_key", "too_large", "wrong_fleet",
    "no_variant",
    # what the device decided about a valid manifest
    "not_targeted", "downgrade", "replayed", "incompatible",
    # fetching the blocks (agent.update.blobs.BlobError reasons)
    "hash_mismatch", "timeout", "cancelled",
    # installing them
    "self_test_failed", "health_degraded", "active_corrupt", "internal",
]

TERMINAL: frozenset[str] = frozenset({"applied", "rejected", "rolled_back"})
MAX_REPORT_BYTES = 16 * 1024


class UpdateReportError(KnetAgentError, ValueError):
    """A payload on an ``update`` topic that is not a valid report."""


class UpdateReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str
    session: int = Field(ge=0)
    model_id: str
    version: int = Field(ge=0)
    from_version: int | None = Field(None, ge=0)
    status: Status
    reason: RejectReason | None = None
    detail: str = Field("", max_length=2000)
    time: float = Field(default_factory=time.time)
    bytes: int = Field(0, ge=0, description="block bytes downloaded for this update")
    seconds: float = Field(0.0, ge=0, description="manifest received -> this outcome")

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.status == "applied"

    def payload(self) -> builtins.bytes:  # `bytes` is a field here
        return json.dumps(self.model_dump(mode="json"), separators=(",", ":")).encode()

    @classmethod
    def parse(cls, payload: builtins.bytes) -> UpdateReport:
        if len(payload) > MAX_REPORT_BYTES:
            raise UpdateReportError(f"report of {len(payload)} bytes > {MAX_REPORT_BYTES}")
        try:
            safejson.check_bounds(payload, max_bytes=MAX_REPORT_BYTES)
        except safejson.UnsafeJSONError as exc:
            raise UpdateReportError(f"not an update report: {exc}") from None
        try:
            return cls.model_validate_json(payload)
        except ValidationError as exc:
            raise UpdateReportError(f"not an update report: {exc.errors()[:3]}") from None

"""Fencing: a deposed scheduler leader cannot finish writing a run, a version or a rollout.

The advisory lock (``leader.py``) says who leads *now*; a leader that lost its lock session
(a dropped connection, a stalled process) may still be in the middle of a run while another
replica already leads. So every election increments the fleet's epoch (``claim_epoch``, in
the lock's own session, right after the lock was granted), and the leader's SQLAlchemy
connections carry that epoch (``install``: ``knet.epoch`` set at every pool checkout).
Statement triggers on ``trainer_runs``, ``model_versions``, ``version_blocks`` and
``block_weights`` (migration 0002) compare it with the current epoch, reading the epoch row
``FOR SHARE``: a new leader's increment waits for the old leader's write in flight, and
every write of the old leader after it fails with ``FencedError``.

What the database cannot fence is an MQTT publish: ``check`` reads the epoch just before a
manifest goes out (``service.py``'s channel), which leaves a window of one round trip.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy import Engine, event, text

from cloud_trainer.errors import KnetTrainerError

FENCED_SQLSTATE = "KN001"  # raised by knet_fence() (migration 0002)


class FencedError(KnetTrainerError, RuntimeError):
    """This process's leadership epoch is over: another replica leads now."""


def claim_epoch(conn: psycopg.Connection[Any], fleet: str, holder: str) -> int:
    """Start a new epoch for ``fleet`` (call holding the scheduler's advisory lock)."""
    row = conn.execute(
        "INSERT INTO leader_epochs (fleet, epoch, holder, since) VALUES (%s, 1, %s, %s) "
        "ON CONFLICT (fleet) DO UPDATE SET epoch = leader_epochs.epoch + 1, "
        "holder = EXCLUDED.holder, since = EXCLUDED.since RETURNING epoch",
        (fleet, holder, time.time())).fetchone()
    assert row is not None
    return int(row[0])


def install(engine: Engine, fleet: str, epoch: Callable[[], int | None]) -> None:
    """Tag every connection ``engine`` hands out with this process's epoch (None: not a
    leader yet, writes unfenced), and turn the trigger's refusal into ``FencedError``."""

    @event.listens_for(engine, "checkout")
    def _tag(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        mine = epoch()
        with dbapi_conn.cursor() as cur:
            cur.execute("SELECT set_config('knet.epoch', %s, false), "
                        "set_config('knet.fleet', %s, false)",
                        ("" if mine is None else str(mine), fleet))
        if not dbapi_conn.autocommit:
            dbapi_conn.commit()  # set_config(.., false) lasts for the session

    @event.listens_for(engine, "handle_error")
    def _fenced(context: Any) -> None:
        orig = context.original_exception
        if getattr(orig, "sqlstate", None) == FENCED_SQLSTATE:
            raise FencedError(orig.diag.message_primary or str(orig)) from orig


def check(engine: Engine, fleet: str, mine: int | None) -> None:
    """Raise ``FencedError`` unless ``mine`` is the fleet's current epoch (None: unfenced)."""
    if mine is None:
        return
    with engine.connect() as conn:
        now = conn.scalar(text("SELECT epoch FROM leader_epochs WHERE fleet = :f"),
                          {"f": fleet})
    if now != mine:
        raise FencedError(f"leader epoch {mine} of fleet {fleet} is over (now {now})")

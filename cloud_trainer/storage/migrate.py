"""Schema migrations (Alembic) and the start-up check that the schema is the one this build reads.

The trainer never migrates on its own at start: with N replicas of mixed versions rolling
out, an implicit upgrade by whichever starts first would change the schema under the others.
The operator runs ``knet-trainer db upgrade --config trainer.toml`` (once, from one host);
every process checks the revision at start and refuses a schema older or newer than its own,
naming that command.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from cloud_trainer.errors import KnetTrainerError

UPGRADE_COMMAND = "knet-trainer db upgrade --config trainer.toml"
_SCRIPTS = Path(__file__).resolve().parent / "migrations"


class SchemaError(KnetTrainerError, RuntimeError):
    """The database's schema is missing, older than this build, or unknown to it."""


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_SCRIPTS))
    return cfg


def head() -> str:
    """The revision this build reads."""
    rev = ScriptDirectory.from_config(_config()).get_current_head()
    assert rev is not None
    return rev


def current(engine: Engine) -> str | None:
    """The database's revision (None: no knet schema yet)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Bring the schema to ``revision``; returns (before, after). Serialised across hosts by
    an advisory lock, so two operators running it at once do not interleave DDL."""
    cfg = _config()
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7259001)")  # 'knet' migrations
        before = MigrationContext.configure(conn).get_current_revision()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        after = MigrationContext.configure(conn).get_current_revision()
    assert after is not None
    return before, after


def check(engine: Engine, where: str) -> str:
    """Raise SchemaError unless the schema is exactly this build's head; returns it."""
    return verdict(current(engine), where)


def verdict(have: str | None, where: str) -> str:
    """``check`` of a revision already read (the sample store reads it on its own driver):
    raise SchemaError naming what to run unless it is this build's head; returns it."""
    want = head()
    if have == want:
        return have
    if have is None:
        raise SchemaError(f"database {where} has no knet schema: run `{UPGRADE_COMMAND}`")
    scripts = ScriptDirectory.from_config(_config())
    known = {s.revision for s in scripts.walk_revisions()}
    if have in known:
        raise SchemaError(f"database {where} has schema revision {have}, this build needs "
                          f"{want}: run `{UPGRADE_COMMAND}`")
    raise SchemaError(f"database {where} has schema revision {have}, unknown to this build "
                      f"(which reads {want}): it was upgraded by a newer knet; upgrade this "
                      "host's knet too")

"""SQLAlchemy engines on the ``[database]`` PostgreSQL (registry, run log, job store)."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine

from cloud_trainer.storage.config import DatabaseSection


def make_engine(db: DatabaseSection, pool_size: int = 5) -> Engine:
    """An engine whose connections carry the keepalives and are checked before use
    (``pool_pre_ping``: a pooled connection that died with a PostgreSQL restart is replaced
    instead of failing the next query)."""
    return create_engine(db.sqlalchemy_url(), pool_pre_ping=True, pool_size=pool_size,
                         connect_args={"options": _server_keepalives(db)})


def _server_keepalives(db: DatabaseSection) -> str:
    return (f"-c tcp_keepalives_idle={db.keepalive_idle_s} "
            f"-c tcp_keepalives_interval={db.keepalive_interval_s} "
            f"-c tcp_keepalives_count={db.keepalive_count}")

"""Leader fencing, update blobs shared by every replica, samples' payload stored as is.

* ``leader_epochs``: one row per fleet whose ``epoch`` a replica increments when it takes
  the scheduler's advisory lock (``storage/leader.py``). A leader's connections carry its
  epoch (``knet.epoch``, ``storage/fence.py``); the statement triggers below refuse a write
  to runs, versions or block weights from a connection whose epoch is not the current one,
  and take the epoch row ``FOR SHARE``, so a new leader's increment waits for a write in
  flight and every later write of the old leader fails: a fence, not a check-then-write.
* ``update_blobs``: every block a leader published (its bytes and chunking), so a replica
  that takes over answers devices' chunk re-requests for updates the dead leader pushed.
* ``samples.payload`` ``STORAGE EXTERNAL``: payloads are codec frames, compressed already;
  PostgreSQL's default (``EXTENDED``) ran pglz over each one first (measured: server CPU per
  stored sample 86-93 µs → 40-50 µs, docs/benchmarks.md).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

FENCED = ("trainer_runs", "model_versions", "version_blocks", "block_weights")

_FENCE = """
CREATE FUNCTION knet_fence() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mine text := current_setting('knet.epoch', true);
    my_fleet text := current_setting('knet.fleet', true);
    now_epoch bigint;
BEGIN
    IF mine IS NULL OR mine = '' THEN
        RETURN NULL;  -- not a leader's connection (CLI, tools): not fenced
    END IF;
    SELECT epoch INTO now_epoch FROM leader_epochs WHERE leader_epochs.fleet = my_fleet
        FOR SHARE;
    IF now_epoch IS DISTINCT FROM mine::bigint THEN
        RAISE EXCEPTION 'knet fenced: leader epoch % of fleet % is over (now %)',
            mine, my_fleet, now_epoch USING ERRCODE = 'KN001';
    END IF;
    RETURN NULL;
END $$;
"""


def upgrade() -> None:
    op.create_table(
        "leader_epochs",
        sa.Column("fleet", sa.Text, primary_key=True),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("since", sa.Float, nullable=False),
    )
    op.execute(_FENCE)
    for table in FENCED:
        op.execute(f"CREATE TRIGGER {table}_fence BEFORE INSERT OR UPDATE OR DELETE ON {table} "
                   "FOR EACH STATEMENT EXECUTE FUNCTION knet_fence()")
    op.create_table(
        "update_blobs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        # agent.update.update_manifest.ChunkInfo, JSON
        sa.Column("chunks", sa.Text, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("published_at", sa.Float, nullable=False),
    )
    for table, column in (("update_blobs", "data"), ("samples", "payload"),
                          ("block_weights", "data")):
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE EXTERNAL")


def downgrade() -> None:
    for table, column in (("samples", "payload"), ("block_weights", "data")):
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE EXTENDED")
    op.drop_table("update_blobs")
    for table in FENCED:
        op.execute(f"DROP TRIGGER {table}_fence ON {table}")
    op.execute("DROP FUNCTION knet_fence()")
    op.drop_table("leader_epochs")

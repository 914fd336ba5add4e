"""The first PostgreSQL schema: samples, registry, run log, block weights, job store.

Mirrors the SQLite layout (``cloud_trainer/ingest/store.py``, ``registry.py``, ``runs.py``) so the
same classes read both; the APScheduler table is created here rather than by APScheduler
itself so that N replicas starting at once never race on its ``CREATE TABLE``.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TOTALS = """
CREATE FUNCTION knet_samples_ins() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO device_totals (device, count, bytes)
    SELECT device, COUNT(*), SUM(size) FROM new_rows GROUP BY device ORDER BY device
    ON CONFLICT (device) DO UPDATE SET count = device_totals.count + EXCLUDED.count,
                                       bytes = device_totals.bytes + EXCLUDED.bytes;
    RETURN NULL;
END $$;
CREATE FUNCTION knet_samples_del() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE device_totals t SET count = t.count - d.n, bytes = t.bytes - d.b
    FROM (SELECT device, COUNT(*) AS n, SUM(size) AS b FROM old_rows GROUP BY device) d
    WHERE t.device = d.device;
    RETURN NULL;
END $$;
CREATE TRIGGER samples_ins AFTER INSERT ON samples REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION knet_samples_ins();
CREATE TRIGGER samples_del AFTER DELETE ON samples REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION knet_samples_del();
"""


def upgrade() -> None:
    op.create_table(
        "samples",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("device", sa.Text, nullable=False),
        sa.Column("session", sa.BigInteger, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("timestamp", sa.Float, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("model_id", sa.Text),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("boundary", sa.Integer, nullable=False),
        sa.Column("label", sa.Integer),
        sa.Column("prediction", sa.Integer),
        sa.Column("confidence", sa.Float),
        sa.Column("shape", sa.Text),
        sa.Column("meta", sa.Text),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("device", "session", "seq", name="samples_key"),
    )
    op.create_index("samples_boundary_version_time", "samples",
                    ["boundary", "model_version", "received_at"])
    op.create_index("samples_received", "samples", ["received_at"])
    op.create_index("samples_device", "samples", ["device", "id"])
    op.create_table(
        "device_totals",
        sa.Column("device", sa.Text, primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )
    op.execute(_TOTALS)

    op.create_table(
        "block_weights",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.String(64), nullable=False, index=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("parent", sa.Integer),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window", sa.JSON, nullable=False),
        sa.Column("scores", sa.JSON, nullable=False),
        sa.Column("info", sa.JSON, nullable=False),
        sa.UniqueConstraint("model_id", "version"),
    )
    op.create_table(
        "version_blocks",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version_id", sa.Integer, sa.ForeignKey("model_versions.id"), nullable=False),
        sa.Column("index", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False, index=True),
        sa.UniqueConstraint("version_id", "index"),
    )
    op.create_table(
        "trainer_runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.String(40), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False, index=True),
        sa.Column("model_id", sa.String(64), nullable=False),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("step", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("deployed_version", sa.Integer),
        sa.Column("version", sa.Integer),
        sa.Column("since", sa.Float, nullable=False),
        sa.Column("until", sa.Float, nullable=False),
        sa.Column("consumed", sa.Integer, nullable=False),
        sa.Column("reason", sa.String(1000), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_table(
        "update_reports",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("device", sa.String(64), nullable=False, index=True),
        sa.Column("model_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32)),
        sa.Column("detail", sa.String(2000), nullable=False),
        sa.Column("time", sa.Float, nullable=False),
    )
    # APScheduler 3.x SQLAlchemyJobStore's table, exactly as it defines it.
    op.create_table(
        "apscheduler_jobs",
        sa.Column("id", sa.Unicode(191), primary_key=True),
        sa.Column("next_run_time", sa.Float(25), index=True),
        sa.Column("job_state", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    for table in ("apscheduler_jobs", "update_reports", "trainer_runs", "version_blocks",
                  "model_versions", "block_weights"):
        op.drop_table(table)
    op.execute("DROP TABLE samples; DROP TABLE device_totals; "
               "DROP FUNCTION knet_samples_ins(); DROP FUNCTION knet_samples_del();")

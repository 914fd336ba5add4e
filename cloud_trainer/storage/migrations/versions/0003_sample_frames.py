"""A batch envelope's frame stored once: ``frames`` beside per-sample key rows in ``samples``.

``samples`` kept one row per sample with its own codec frame, so a batch of N samples was
cut into N frames and written N times. From here ``frames`` keeps each accepted message's
frame once, as received, with what its samples share (arrival time, model, boundary,
shape, meta); ``samples`` keeps the key row of each sample (the unique
``(device, session, seq)``, its per-sample fields, ``frame``, ``part``: its position in a
batch frame or NULL for a whole version-1 frame, ``size``: its share of the frame's bytes).
Readers see per-sample frames as before (``cloud_trainer.ingest.store._Reader`` cuts a batch
frame when its samples are read). The per-device totals triggers stay; a new statement
trigger deletes a frame once its last sample is deleted.

Upgrade: every existing sample becomes a frame of its own (same id). Downgrade cuts batch
frames back into per-sample frames in Python (``agent.wire.codec.split_batch``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_MOVED = ("received_at", "model_id", "model_version", "boundary", "shape", "meta", "payload")

_GC = """
CREATE FUNCTION knet_frames_gc() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM frames f USING (SELECT DISTINCT frame FROM old_rows) o
    WHERE f.id = o.frame AND NOT EXISTS (SELECT 1 FROM samples s WHERE s.frame = o.frame);
    RETURN NULL;
END $$;
CREATE TRIGGER samples_frames_gc AFTER DELETE ON samples REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION knet_frames_gc();
"""


def upgrade() -> None:
    op.create_table(
        "frames",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("model_id", sa.Text),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("boundary", sa.Integer, nullable=False),
        sa.Column("shape", sa.Text),
        sa.Column("meta", sa.Text),
        sa.Column("payload", sa.LargeBinary, nullable=False),
    )
    # Codec frames are compressed already (0002 measured pglz's cost on them).
    op.execute("ALTER TABLE frames ALTER COLUMN payload SET STORAGE EXTERNAL")
    op.execute(f"INSERT INTO frames (id, {', '.join(_MOVED)}) OVERRIDING SYSTEM VALUE "
               f"SELECT id, {', '.join(_MOVED)} FROM samples")
    op.execute("SELECT setval(pg_get_serial_sequence('frames', 'id'), "
               "COALESCE((SELECT MAX(id) FROM frames), 0) + 1, false)")
    op.add_column("samples", sa.Column("meta_index", sa.BigInteger))
    op.add_column("samples", sa.Column("frame", sa.BigInteger))
    op.add_column("samples", sa.Column("part", sa.Integer))
    op.execute("UPDATE samples SET frame = id")
    op.alter_column("samples", "frame", nullable=False)
    op.drop_index("samples_boundary_version_time", "samples")
    op.drop_index("samples_received", "samples")
    for column in _MOVED:
        op.drop_column("samples", column)
    op.create_index("samples_frame", "samples", ["frame"])
    op.create_index("frames_boundary_version_time", "frames",
                    ["boundary", "model_version", "received_at"])
    op.create_index("frames_received", "frames", ["received_at"])
    op.execute(_GC)


def downgrade() -> None:
    from agent.wire.codec import split_batch

    op.execute("DROP TRIGGER samples_frames_gc ON samples; DROP FUNCTION knet_frames_gc();")
    op.add_column("samples", sa.Column("received_at", sa.Float))
    op.add_column("samples", sa.Column("model_id", sa.Text))
    op.add_column("samples", sa.Column("model_version", sa.Integer))
    op.add_column("samples", sa.Column("boundary", sa.Integer))
    op.add_column("samples", sa.Column("shape", sa.Text))
    op.add_column("samples", sa.Column("meta", sa.Text))
    op.add_column("samples", sa.Column("payload", sa.LargeBinary))
    op.execute("ALTER TABLE samples ALTER COLUMN payload SET STORAGE EXTERNAL")
    op.execute(
        "UPDATE samples s SET received_at = f.received_at, model_id = f.model_id, "
        "model_version = f.model_version, boundary = f.boundary, shape = f.shape, "
        "meta = CASE WHEN s.meta_index IS NULL THEN f.meta ELSE "
        "(COALESCE(f.meta, '{}')::jsonb || jsonb_build_object('index', s.meta_index))::text "
        "END, payload = CASE WHEN s.part IS NULL THEN f.payload END FROM frames f "
        "WHERE f.id = s.frame")
    conn = op.get_bind()
    batches = conn.execute(sa.text("SELECT id, payload FROM frames WHERE id IN "
                                   "(SELECT frame FROM samples WHERE part IS NOT NULL)"))
    for frame_id, payload in batches.fetchall():
        parts = split_batch(bytes(payload), max_bytes=1 << 40, values=False).frames
        for sample_id, part in conn.execute(sa.text(
                "SELECT id, part FROM samples WHERE frame = :f"), {"f": frame_id}).fetchall():
            conn.execute(sa.text("UPDATE samples SET payload = :p, size = :n WHERE id = :i"),
                         {"p": parts[part], "n": len(parts[part]), "i": sample_id})
    op.execute("UPDATE device_totals t SET bytes = d.b FROM (SELECT device, SUM(size) AS b "
               "FROM samples GROUP BY device) d WHERE t.device = d.device")
    for column in ("received_at", "model_version", "boundary", "payload"):
        op.alter_column("samples", column, nullable=False)
    op.drop_index("samples_frame", "samples")
    for column in ("meta_index", "frame", "part"):
        op.drop_column("samples", column)
    op.drop_table("frames")
    op.create_index("samples_boundary_version_time", "samples",
                    ["boundary", "model_version", "received_at"])
    op.create_index("samples_received", "samples", ["received_at"])

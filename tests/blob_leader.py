"""Child process for tests/test_blob_takeover_pg.py: a leading trainer's publishing half.

``python tests/blob_leader.py PORT DB_URL PASSWORD_FILE STATE_DIR UPDATE_JSON``: takes the
fleet's scheduler lock (``LeaderLock``), publishes the signed update named by UPDATE_JSON
(``{"manifest": path, "files": {sha: path}}``) with a ``BlobPublisher`` that shares its
blocks in PostgreSQL and answers re-requests while it leads, prints ``pushed``, then serves
until it is killed (the test SIGKILLs it).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.update.update_manifest import SignedManifest  # noqa: E402
from agent.wire.topics import Topics  # noqa: E402
from cloud_trainer.release.publisher import BlobPublisher, PublisherSettings  # noqa: E402
from cloud_trainer.storage.blobs import SharedBlobs  # noqa: E402
from cloud_trainer.storage.config import DatabaseSection  # noqa: E402
from cloud_trainer.storage.engine import make_engine  # noqa: E402
from cloud_trainer.storage.leader import LeaderLock  # noqa: E402

FLEET = "lab"


def main() -> None:
    port, url, password_file, state_dir, update = sys.argv[1:6]
    db = DatabaseSection(url=url, password_file=Path(password_file))
    elected = threading.Event()
    lock = LeaderLock(db.conninfo(), FLEET, on_elected=elected.set, on_lost=print,
                      poll_s=0.2, holder="leader-a").start()
    if not elected.wait(60):
        raise SystemExit("not elected")
    spec = json.loads(Path(update).read_text())
    signed = SignedManifest.model_validate_json(Path(spec["manifest"]).read_bytes())
    files = {sha: Path(p) for sha, p in spec["files"].items()}
    pub = BlobPublisher(PublisherSettings(port=int(port), client_id="leader-a"), Topics(FLEET),
                        Path(state_dir) / "blobs", shared=SharedBlobs(make_engine(db)),
                        answers=lambda: lock.is_leader, push_delay=0.0).start()
    pub.publish_update(signed, files)
    print("pushed", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()

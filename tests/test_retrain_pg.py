"""A whole retraining run with the trainer's state in PostgreSQL (`[database]`): samples read
from the PostgreSQL store, the candidate registered with its weights in the database, the
run logged there, the update signed and pushed over a real Mosquitto; another replica (an
empty local cache) then loads the pushed version from the database alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from mqtt_helpers import Collector
from sqlalchemy import text
from test_retrain import deployed  # noqa: F401  (the module-scoped fixture)
from trainer_helpers import FLEET, boundary_envelopes, job, trainer_toml

from agent.update.update_manifest import SignedManifest
from agent.wire.topics import Topics
from broker.launcher import Mosquitto
from cloud_trainer.ingest.postgres import PostgresSampleStore
from cloud_trainer.models.blocks import BlockModel
from cloud_trainer.models.data import digits_splits
from cloud_trainer.release.registry import Registry
from cloud_trainer.release.runs import RunLog
from cloud_trainer.service import TrainerService
from cloud_trainer.storage.config import DatabaseSection
from cloud_trainer.storage.engine import make_engine
from cloud_trainer.trainer_config import load_trainer_config

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]


def test_run_on_postgresql_pushes_and_another_replica_loads_it(
        tmp_path: Path, mosquitto: Mosquitto, deployed: BlockModel,  # noqa: F811
        pg_database: Callable[..., DatabaseSection]) -> None:
    db = pg_database()
    engine = make_engine(db)
    Registry(tmp_path / "seed", engine=engine).add_version(
        "digits", [deployed.block(i).state_dict() for i in range(1, deployed.num_blocks + 1)],
        status="pushed", reason="test deployment")
    with PostgresSampleStore(db.conninfo()) as store:
        assert store.add_many(boundary_envelopes(deployed, digits_splits().x_train, 0)) > 1000
    config = load_trainer_config(trainer_toml(
        tmp_path, mosquitto.port,
        jobs=[job("better", boundaries=[0], training={"blocks": [2, 3, 4], "epochs": 8})],
        database={"url": db.url, "password_file": db.password_file}))
    topics = Topics(FLEET)
    with Collector(mosquitto.host, mosquitto.port, topics.manifest) as manifests, \
            TrainerService(config, oneshot=True) as svc:
        run = svc.run_job("better")
        assert run.status == "pushed", run
        assert manifests.wait_for(lambda m: bool(m), 10)
        signed = SignedManifest.model_validate_json(manifests.messages[-1][1])
    # Every block the update names is in the database: any replica can serve its chunks.
    with engine.connect() as conn:
        shared = {r[0] for r in conn.execute(text("SELECT sha256 FROM update_blobs"))}
    assert {b.sha256 for v in signed.manifest.variants for b in v.partition.blocks} <= shared
    other = Registry(tmp_path / "other-replica", engine=engine)
    v2 = other.deployed("digits")
    assert v2 is not None and v2.version == 2 and v2.info["run_id"] == run.run_id
    assert v2.scores["gate"]["passed"]
    for sha in v2.blocks.values():  # every block from the database, none from a local file
        other.load_block(sha)
    assert RunLog(tmp_path / "x", engine=engine).get(run.run_id).detail["trainer"] == \
        config.trainer.id
    assert not (tmp_path / "state" / "registry" / "registry.sqlite3").exists()
    engine.dispose()

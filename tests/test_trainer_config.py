"""trainer.toml: the documented example loads; every mistake is refused naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.configfile import ConfigError
from cloud_trainer.trainer_config import load_trainer_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "examples" / "trainer.toml"

MINIMAL = """
[trainer]
signing_key_file = "keys/k.key"
state_dir = "state"
[models.digits]
"""


def test_example_loads() -> None:
    c = load_trainer_config(EXAMPLE)
    assert c.trainer.id == "trainer-1" and c.models["digits"].profiles[0] == "x86-dev"
    assert c.jobs[0].cron == "0 3 * * *" and c.jobs[0].gate.margin == 0.5
    assert c.split.enabled and c.rollout.required_success_ratio == 1.0
    assert c.mqtt.password_file == Path("/etc/knet/trainer.password")


def test_minimal_resolves_paths_against_the_file(tmp_path: Path) -> None:
    path = tmp_path / "trainer.toml"
    path.write_text(MINIMAL)
    c = load_trainer_config(path)
    assert c.trainer.state_dir == tmp_path / "state"
    assert c.trainer.signing_key_file == tmp_path / "keys" / "k.key"
    assert c.jobs == [] and c.models["digits"].zoo == "digits"
    assert c.jobs_db == tmp_path / "state" / "jobs.sqlite3"


JOB = '\n[[jobs]]\nid = "j"\nmodel = "digits"\n'


@pytest.mark.parametrize(("extra", "message"), [
    ("\n[mqtt]\nprot = 1883\n", "mqtt.prot: unknown key"),
    ("\n[mqtt]\nport = 70000\n", "mqtt.port"),
    ('\n[mqtt]\npassword = "a"\npassword_file = "b"\n', "only one of password, password_file"),
    (JOB + "interval_s = 60\n" + 'model_typo = 1\n', "jobs.0.model_typo: unknown key"),
    (JOB + "min_new_samples = 5\n", "exactly one of interval_s or cron"),
    (JOB + 'interval_s = 5\ncron = "* * * * *"\n', "exactly one of interval_s or cron"),
    (JOB + 'cron = "61 * * * *"\n', "jobs.0.cron"),
    (JOB + "interval_s = 5\n[jobs.gate]\nmargin = -1\n", "jobs.0.gate.margin"),
    (JOB + 'interval_s = 5\ndevices = ["Bad Id"]\n', "jobs.0.devices"),
    ('\n[[jobs]]\nid = "j"\nmodel = "vision2"\ninterval_s = 5\n', "model 'vision2' is not"),
    (JOB + "interval_s = 5\n" + JOB + "interval_s = 5\n", "job ids must be unique"),
    ("\n[rollout]\ncanary_fraction = 0\n", "rollout.canary_fraction"),
    ('\n[models.vision]\nzoo = "resnet"\n', "models.vision.zoo"),
    ('\n[models.vision]\nprofiles = ["no-such-board"]\n', "no-such-board"),
    ('\n[split]\nmodel = "other"\n', "split.model"),
])
def test_mistakes_name_the_field(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "trainer.toml"
    path.write_text(MINIMAL + extra)
    with pytest.raises(ConfigError) as err:
        load_trainer_config(path)
    assert message in str(err.value) and "trainer.toml" in str(err.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_trainer_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[trainer\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_trainer_config(tmp_path / "bad.toml")
    (tmp_path / "t.toml").write_text("[models.digits]\n")
    with pytest.raises(ConfigError, match="trainer: Field required"):
        load_trainer_config(tmp_path / "t.toml")


def test_every_trainer_connection_takes_its_settings_from_mqtt(tmp_path: Path) -> None:
    from agent.mqtt.endpoint import MqttEndpoint
    from cloud_trainer.ingest.ingestor import IngestSettings

    path = tmp_path / "trainer.toml"
    path.write_text(MINIMAL + '\n[mqtt]\nusername = "trainer-1"\npassword = "pw"\n'
                    'keepalive = 17\nreconnect_min_delay = 0.25\nreconnect_max_delay = 4.0\n'
                    'connection_accounts = true\nclient_id = "main-1"\n'
                    '[mqtt.tls]\nca_file = "ca.crt"\ncert_file = "c/t.crt"\n'
                    'key_file = "c/t.key"\n')
    m = load_trainer_config(path).mqtt
    ingest = m.connection("ingest").derive(IngestSettings, client_id="knet-ingest-t")
    split = m.connection("split").derive(MqttEndpoint)
    for ep in (ingest, split):
        assert (ep.keepalive, ep.reconnect_min_delay, ep.reconnect_max_delay) == (17, 0.25, 4.0)
        assert ep.password is not None and ep.password.get_secret_value() == "pw"
    assert ingest.username == "trainer-1.ingest" and split.username == "trainer-1.split"
    assert ingest.tls is not None and ingest.tls.cert_file == tmp_path / "c" / "ingest" / "t.crt"
    # A connection's own client id and session are never the main connection's.
    assert split.client_id is None and ingest.client_id == "knet-ingest-t"
    assert (ingest.clean_start, ingest.session_expiry) == (False, 24 * 3600)
    assert (m.client_id, m.clean_start, m.session_expiry) == ("main-1", True, 0)

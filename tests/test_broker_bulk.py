"""Bulk provisioning and revocation from device list files (`knet broker provision --list`,
`knet broker revoke --list`), as an operator runs them, and against a real Mosquitto."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_helpers import Collector, wait_until
from test_broker_mqtt import ACCEPTED, NOT_AUTHORIZED, Client, connect

from agent.config import load_config
from broker import provision
from broker.bulk import provision_list
from broker.devicelist import DeviceEntry, DeviceListError, load_device_list, load_revoke_list
from broker.launcher import Mosquitto, free_port, wait_for_port
from broker.provision import (
    Credentials,
    fleet_settings,
    layout,
    load_registry,
    provision_device,
    provision_trainer,
    revoke_accounts,
)
from cloud_trainer.release.keys import generate_keypair
from knet_cli.main import main

REPO = Path(__file__).resolve().parent.parent
THREE = "device_id,fleet,profile\ncam-01,lab,rpi4\ncam-02,lab,rpi5\ngate-01,yard,jetson-nano\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``root``: content, mtime and mode (a rewrite changes the mtime)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def bundle_login(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, int, str]:
    """(username, password, port, CA file) as the agent reads them from its bundle, with the
    credential directory systemd's LoadCredential= would give it."""
    config = load_config(bundle / "agent.toml")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(bundle / "credentials"))
    secret = config.mqtt.resolve_password()
    assert secret is not None and config.mqtt.username and config.mqtt.tls
    return (config.mqtt.username, secret.get_secret_value(), config.mqtt.port,
            str(config.mqtt.tls.ca_file))


# -- list files --------------------------------------------------------------------------------
def test_csv_and_toml_lists_give_the_same_devices(tmp_path: Path) -> None:
    csv_file = write(tmp_path / "devices.csv",
                     "\ufeff# the lab's cameras\n fleet , device_id,profile\n\n"
                     "lab, cam-01 ,rpi4\n# gone: cam-00\nyard,gate-01,jetson-nano\n")
    toml_file = write(tmp_path / "devices.toml",
                      '[[devices]]\nid = "cam-01"\nfleet = "lab"\nprofile = "rpi4"\n\n'
                      '[[devices]]  # the gate\nid = "gate-01"\nfleet = "yard"\n'
                      'profile = "jetson-nano"\n')
    want = [DeviceEntry(id="cam-01", fleet="lab", profile="rpi4"),
            DeviceEntry(id="gate-01", fleet="yard", profile="jetson-nano")]
    assert load_device_list(csv_file, ["rpi4", "jetson-nano"]) == want
    assert load_device_list(toml_file, ["rpi4", "jetson-nano"]) == want
    revoke = load_revoke_list(write(tmp_path / "r.csv", "device_id\ncam-01\n"))
    assert [(e.id, e.fleet) for e in revoke] == [("cam-01", None)]


BAD_LISTS = [
    ("bad column", "devices.csv", "device_id,fleet,profil\ncam-01,lab,rpi4\n",
     "devices.csv: line 1: unknown column 'profil' (expected the header "
     "device_id,fleet,profile)"),
    ("missing column", "devices.csv", "device_id,fleet\ncam-01,lab\n",
     "devices.csv: line 1: missing column 'profile'"),
    ("unknown key", "devices.toml",
     '[[devices]]\nid = "cam-01"\nfleet = "lab"\nprofile = "rpi4"\n\n'
     '[[devices]]\nid = "cam-02"\nfleet = "lab"\nprofile = "rpi4"\nhost = "x"\n',
     "devices.toml: line 6: host: unknown key"),
    ("duplicate id", "devices.csv",
     "device_id,fleet,profile\ncam-01,lab,rpi4\ncam-02,lab,rpi4\ncam-01,yard,rpi5\n",
     "devices.csv: line 4: device_id: 'cam-01' is already listed on line 2"),
    ("bad id", "devices.csv", "device_id,fleet,profile\ncam-01,lab,rpi4\nCam_02,lab,rpi4\n",
     "devices.csv: line 3: device_id: device id 'Cam_02' must be 1-63 characters of "
     "lowercase a-z, 0-9 and '-'"),
    ("reserved id", "devices.toml", '[[devices]]\nid = "model"\nfleet = "lab"\n'
     'profile = "rpi4"\n', "devices.toml: line 1: id: device id 'model' is reserved"),
    ("bad fleet", "devices.csv", "device_id,fleet,profile\ncam-01,Lab!,rpi4\n",
     "devices.csv: line 2: fleet: fleet id 'Lab!' must be"),
    ("unknown profile", "devices.csv", "device_id,fleet,profile\ncam-01,lab,rpi44\n",
     "devices.csv: line 2: profile: no firmware profile 'rpi44' (known: "),
    ("missing cell", "devices.csv", "device_id,fleet,profile\ncam-01,lab\n",
     "devices.csv: line 2: 2 cells, the header has 3"),
    ("not a string", "devices.toml", '[[devices]]\nid = "cam-01"\nfleet = 7\n'
     'profile = "rpi4"\n', "devices.toml: line 1: fleet: Input should be a valid string"),
    ("empty csv", "devices.csv", "", "devices.csv: empty file: the first line must be the "
     "header device_id,fleet,profile"),
    ("header only", "devices.csv", "device_id,fleet,profile\n",
     "devices.csv: no devices in the list"),
    ("empty toml", "devices.toml", "", "devices.toml: no devices in the list"),
    ("broken toml", "devices.toml", '[[devices]]\nid = "cam-01\n',
     "devices.toml: not valid TOML: "),
    ("other format", "devices.txt", "cam-01 lab rpi4\n",
     "devices.txt: unknown list format '.txt'"),
]


@pytest.mark.parametrize(("name", "filename", "text", "error"), BAD_LISTS,
                         ids=[b[0] for b in BAD_LISTS])
def test_a_malformed_list_is_one_clear_error_exit_2_and_nothing_written(
        name: str, filename: str, text: str, error: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    listed = write(tmp_path / filename, text)
    d = tmp_path / "fleet"
    assert main(["broker", "provision", "--list", str(listed), "--dir", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"knet broker provision: {listed}"), err
    assert error in err[0], err
    assert not d.exists()  # not even an empty fleet directory


def test_list_and_single_account_options_do_not_mix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listed = write(tmp_path / "devices.csv", THREE)
    d = str(tmp_path / "fleet")
    for argv, says in (
            (["provision", "cam-09", "--list", str(listed)], "ACCOUNT apply to one account"),
            (["provision", "--list", str(listed), "--cert"], "--cert apply to one account"),
            (["provision"], "give ACCOUNT and --fleet, or --list FILE"),
            (["provision", "cam-09", "--fleet", "lab", "--update-key", "k.pub"],
             "--update-key and --profiles-dir go with --list"),
            (["revoke", "cam-01", "--list", str(listed)], "give the ids to revoke or --list"),
            (["revoke"], "give the ids to revoke or --list")):
        assert main(["broker", *argv, "--dir", d]) == 2, argv
        assert says in capsys.readouterr().err, argv
    assert not Path(d).exists()


def test_every_problem_of_a_list_is_named_in_file_order(tmp_path: Path) -> None:
    listed = write(tmp_path / "devices.csv", "device_id,fleet,profile\ncam-01,lab,rpi9\n"
                                             "cam-01,lab\nCAM,lab,rpi4\n")
    with pytest.raises(DeviceListError) as info:
        load_device_list(listed, ["rpi4"])
    lines = str(info.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["line 2", "line 3", "line 4"]


def test_a_list_that_clashes_with_the_registry_or_a_wrong_key_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "fleet"
    provision_device(d, "gate-01", "lab", reload=False)
    provision_trainer(d, "trainer-1", ["lab"], reload=False)
    before = snapshot(d)
    private = generate_keypair(tmp_path / "keys")[0]
    for clash, extra, reason in (
            ("gate-01,yard,rpi4", [], "belongs to fleet 'lab', the list says 'yard'"),
            ("trainer-1,lab,rpi4", [], "'trainer-1' is a trainer account"),
            ("", ["--update-key", str(private)], "not a PEM public key")):
        listed = write(tmp_path / "devices.csv", f"device_id,fleet,profile\n"
                                                 f"cam-01,lab,rpi4\n{clash}\n")
        assert main(["broker", "provision", "--list", str(listed), "--dir", str(d),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert reason in err and "nothing provisioned" in err, err
        assert snapshot(d) == before


# -- idempotence -------------------------------------------------------------------------------
def test_rerunning_a_list_changes_nothing_and_a_new_row_adds_only_that_device(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "fleet"
    listed = write(tmp_path / "devices.csv", THREE)
    args = ["broker", "provision", "--list", str(listed), "--dir", str(d), "--tls",
            "--host", "localhost", "--port", "8883"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("created ") == 3 and "3 created, 0 updated, 0 unchanged" in out
    lay = layout(d)
    for device, fleet, profile in (("cam-01", "lab", "rpi4"), ("gate-01", "yard",
                                                               "jetson-nano")):
        bundle = lay.bundle(device)
        assert sorted(p.name for p in bundle.rglob("*")) == [
            "agent.toml", "ca.crt", "credentials", "mqtt-password"]
        modes = {p.name: p.stat().st_mode & 0o777 for p in (bundle, *bundle.rglob("*"))}
        assert modes == {device: 0o755, "agent.toml": 0o644, "ca.crt": 0o644,
                         "credentials": 0o700, "mqtt-password": 0o600}  # as /etc/knet
        assert (bundle / "ca.crt").read_bytes() == (lay.certs / "ca.crt").read_bytes()
        config = load_config(bundle / "agent.toml")  # a complete agent config
        assert (config.device.id, config.device.fleet, config.model.profile) == (
            device, fleet, profile)
        assert (config.mqtt.host, config.mqtt.port) == ("localhost", 8883)
        assert config.mqtt.password_credential == "mqtt-password"  # the unit's credential
        user, password, _port, _ca = bundle_login(bundle, monkeypatch)
        assert user == device and len(password) >= 24
        assert load_registry(d)["devices"][device]["profile"] == profile
    passwd = (d / "passwd").read_text()
    assert "cam-01:" in passwd and "cam-01.bench:" in passwd  # as single provisioning

    before = snapshot(d)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("unchanged ") == 3 and "0 created, 0 updated, 3 unchanged" in out
    assert snapshot(d) == before  # not one byte, not one mtime

    write(listed, THREE + "cam-03,lab,x86-dev\n")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "created   cam-03 (fleet lab, profile x86-dev)" in out
    assert "1 created, 0 updated, 3 unchanged" in out
    after = snapshot(d)
    for name, state in before.items():
        if name.startswith("credentials/"):
            assert after[name] == state, name  # the other bundles: untouched
    old = {ln.split(":")[0]: ln for ln in before["passwd"][0].decode().splitlines()}
    new = {ln.split(":")[0]: ln for ln in after["passwd"][0].decode().splitlines()}
    assert set(new) - set(old) == {"cam-03", "cam-03.bench"}
    assert all(new[user] == line for user, line in old.items())  # no password rotated

    # A changed profile and an update key: the config follows, the secret does not.
    pub = generate_keypair(tmp_path / "keys")[1]
    write(listed, THREE.replace("cam-02,lab,rpi5", "cam-02,lab,rpi4") + "cam-03,lab,x86-dev\n")
    secret = (lay.bundle("cam-02") / "credentials" / "mqtt-password").read_bytes()
    assert main([*args, "--update-key", str(pub)]) == 0
    out = capsys.readouterr().out
    assert "updated   cam-02 (fleet lab, profile rpi4) (profile, agent.toml, update.pub)" in out
    assert "0 created, 4 updated, 0 unchanged" in out
    assert (lay.bundle("cam-02") / "credentials" / "mqtt-password").read_bytes() == secret
    assert (d / "passwd").read_bytes() == after["passwd"][0]
    config = load_config(lay.bundle("cam-02") / "agent.toml")
    assert config.model.profile == "rpi4" and config.update.enabled
    assert config.update.load_keys()  # the key in the bundle is the operator's public key


def test_bundles_handed_out_or_made_singly_are_left_alone(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    single = provision_device(d, "cam-01", "lab", reload=False)
    devices = load_device_list(write(tmp_path / "devices.csv", THREE))
    outcomes = {o.device: o for o in provision_list(d, devices, reload=False)}
    assert outcomes["cam-01"].status == "updated"  # the profile is recorded ...
    assert outcomes["cam-01"].changed == ("profile",)
    assert "left as is" in outcomes["cam-01"].note  # ... its bundle is not rewritten
    assert single.password_file and single.password_file.read_text().strip() == single.password
    shutil.rmtree(layout(d).bundle("cam-02"))  # copied to the device, deleted here
    outcomes = {o.device: o for o in provision_list(d, devices, host="10.0.0.5",
                                                    reload=False)}
    assert outcomes["cam-02"].status == "unchanged" and "not here" in outcomes["cam-02"].note
    assert not layout(d).bundle("cam-02").exists()
    assert outcomes["gate-01"].status == "updated"  # its new host
    assert outcomes["gate-01"].changed == ("agent.toml",)


def test_tls_for_a_host_the_server_certificate_does_not_name_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "fleet"
    listed = write(tmp_path / "devices.csv", THREE)
    assert main(["broker", "certs", "--dir", str(d)]) == 0
    capsys.readouterr()
    args = ["broker", "provision", "--list", str(listed), "--dir", str(d), "--host",
            "broker.lan"]
    before = snapshot(d)
    assert main(args) == 2  # TLS because the directory has a CA; server.crt: localhost
    err = capsys.readouterr().err
    assert "is valid for localhost, 127.0.0.1, ::1, not 'broker.lan'" in err
    assert {k: v for k, v in snapshot(d).items() if k != ".lock"} == before
    assert main(["broker", "certs", "--dir", str(d), "--renew-server", "--name", "broker.lan",
                 "--name", "localhost"]) == 0
    assert main(args) == 0
    assert "3 created" in capsys.readouterr().out


# -- revocation --------------------------------------------------------------------------------
def test_revoking_many_replaces_each_broker_file_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "fleet"
    provision_list(d, load_device_list(write(tmp_path / "devices.csv", THREE)), reload=False)
    cert = provision_device(d, "cam-09", "lab", cert=True, reload=False)
    writes: list[str] = []
    real = provision._atomic_write

    def counted(path: Path, text: str, mode: int = 0o600) -> None:
        writes.append(path.name)
        real(path, text, mode)

    monkeypatch.setattr(provision, "_atomic_write", counted)
    # An unknown id or a fleet that is not the device's: nothing at all changes.
    before = snapshot(d)
    assert main(["broker", "revoke", "cam-01", "nobody", "--dir", str(d)]) == 1
    assert "no account 'nobody'" in capsys.readouterr().err
    wrong = write(tmp_path / "wrong.csv", "device_id,fleet\ncam-01,lab\ngate-01,lab\n")
    assert main(["broker", "revoke", "--list", str(wrong), "--dir", str(d)]) == 2
    assert "'gate-01' belongs to fleet 'yard', the list says 'lab'" in capsys.readouterr().err
    assert snapshot(d) == before and writes == []

    done = revoke_accounts(d, ["cam-01", "gate-01", "cam-09"], reload=False)
    assert [(r.account, r.revoked) for r in done] == [("cam-01", True), ("gate-01", True),
                                                      ("cam-09", True)]
    assert sorted(writes) == ["fleet.json", "knet.acl", "passwd"]  # one each
    passwd, acl = (d / "passwd").read_text(), (d / "knet.acl").read_text()
    for gone in ("cam-01", "cam-01.bench", "gate-01", "gate-01.bench", "cam-09"):
        assert f"{gone}:" not in passwd and f"user {gone}\n" not in acl
    assert "cam-02:" in passwd and "user cam-02\n" in acl
    from broker import certs as pki

    assert cert.cert_serial in pki.revoked_serials(layout(d).certs)
    assert not layout(d).bundle("cam-01").exists() and layout(d).bundle("cam-02").exists()
    # A re-run is a no-op that says so.
    writes.clear()
    assert main(["broker", "revoke", "cam-01", "gate-01", "--dir", str(d)]) == 0
    assert capsys.readouterr().out.startswith("already revoked device cam-01\n"
                                              "already revoked device gate-01\n")
    assert writes == []


# -- against a real broker ---------------------------------------------------------------------
@pytest.fixture
def running_broker(tmp_path: Path) -> Iterator[tuple[Path, int, int, Credentials]]:
    """`knet broker run`'s loop (run_foreground) on a fleet directory provisioned from a
    list of three devices, as a child process: (directory, plain port, TLS port, a trainer
    account to watch with). Revocation signals it (SIGHUP)."""
    d = tmp_path / "fleet"
    port, tls_port = free_port(), free_port()
    listed = write(tmp_path / "devices.csv", THREE)
    assert main(["broker", "provision", "--list", str(listed), "--dir", str(d), "--tls",
                 "--port", str(tls_port)]) == 0
    trainer = provision_trainer(d, "trainer-1", ["lab", "yard"])
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO);"
            "from broker.provision import run_foreground;"
            f"sys.exit(run_foreground({str(d)!r}, {port}, tls_port={tls_port}))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_port("127.0.0.1", tls_port, 20) and wait_for_port("127.0.0.1", port, 5)
        # Written once the broker runs: what `knet broker revoke` signals.
        assert wait_until(layout(d).pid_file.exists, 10)
        yield d, port, tls_port, trainer
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


@pytest.mark.mqtt
def test_provision_three_revoke_two_and_the_third_keeps_publishing(
        running_broker: tuple[Path, int, int, Credentials], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    d, port, tls_port, trainer = running_broker
    broker = Mosquitto(layout(d).broker, fleet_settings(d, port))  # host and port only
    states = "knet/v1/+/+/state"  # the trainer's ACL lets the lab and yard states through
    handed_out = tmp_path / "devices"  # each bundle as it went to its device
    for device in ("cam-01", "cam-02", "gate-01"):
        shutil.copytree(layout(d).bundle(device), handed_out / device)
    logins = {dev: bundle_login(handed_out / dev, monkeypatch) for dev in os.listdir(handed_out)}
    clients: dict[str, Client] = {}
    with Collector("127.0.0.1", port, states, username="trainer-1",
                   password=trainer.password) as witness:
        try:
            for device in ("cam-01", "cam-02", "gate-01"):
                user, password, dial, ca = logins[device]
                assert dial == tls_port
                clients[device] = c = connect(broker, user, password, port=dial,
                                              tls={"ca_certs": ca})
                assert c.connack == 0, (device, c.connack)
                fleet = "yard" if device == "gate-01" else "lab"
                assert c.publish(f"knet/v1/{fleet}/{device}/state", b"up") in ACCEPTED
            assert witness.wait_for(lambda m: len(m) == 3, 10), witness.messages

            revoke = write(tmp_path / "revoke.csv", "device_id,fleet,profile\n"
                                                    "cam-01,lab,rpi4\ngate-01,yard,jetson-nano\n")
            assert main(["broker", "revoke", "--list", str(revoke), "--dir", str(d)]) == 0
            assert "revoked device cam-01\nrevoked device gate-01\n" in capsys.readouterr().out
            # The reload (SIGHUP from the revocation) re-checks connected clients.
            for dev in ("cam-01", "gate-01"):
                assert clients[dev].disconnected.wait(10), f"{dev} still connected"
                user, password, dial, ca = logins[dev]
                again = connect(broker, user, password, port=dial, tls={"ca_certs": ca})
                assert again.connack == NOT_AUTHORIZED, (dev, again.connack)
                again.close()
            survivor = clients["cam-02"]
            assert not survivor.disconnected.is_set()
            assert survivor.publish("knet/v1/lab/cam-02/state", b"still here") in ACCEPTED
            assert witness.wait_for(lambda m: (
                "knet/v1/lab/cam-02/state", b"still here", False) in m, 10), witness.messages
        finally:
            for c in clients.values():
                c.close()

"""The trainer's configuration (``trainer.toml``), validated before anything starts.

Unknown keys are rejected at every level and every error names the file, the field and the
reason (``agent.configfile.load_model``). Relative paths resolve against the config file's
directory. ``[mqtt]`` is the endpoint model every knet connection uses; the broker password
may sit in a file (``password_file``) or a systemd credential, so the config holds no
secret. Cross-references are checked here too: a job must name a configured model and a
rollout's canary devices must be valid device ids.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.configfile import ConfigError, load_model, resolve_path
from agent.mqtt.endpoint import MqttEndpoint
from agent.wire.topics import Topics, validate_id
from cloud_trainer.serve.console.config import ConsoleSection
from cloud_trainer.storage.config import DatabaseSection

if TYPE_CHECKING:
    from cloud_trainer.models.blocks import ModelPair

_STRICT = ConfigDict(extra="forbid")




class TrainerSection(BaseModel):
    model_config = _STRICT

    id: str = "trainer-1"
    fleet: str = "default"
    topic_prefix: str = "knet"
    state_dir: Path = Path("/var/lib/knet/trainer")
    signing_key_file: Path = Field(description="Ed25519 private key from `knet keys gen`")
    log_format: Literal["auto", "text", "json"] = Field(
        "auto", description="auto: rich text on a terminal, JSON lines otherwise")

    @field_validator("id", "fleet")
    @classmethod
    def _ids(cls, v: str, info: ValidationInfo) -> str:
        return validate_id(v, "trainer id" if info.field_name == "id" else "fleet id")

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        Topics("default", v)  # raises TopicError (a ValueError) with the reason
        return v

    _paths = field_validator("state_dir", "signing_key_file")(resolve_path)


class MqttSection(MqttEndpoint):
    """The trainer account's endpoint (``agent/mqtt/endpoint.py``, shared with the agent);
    the trainer's connections (main, ingest, split) are each derived from it."""

    # True on a broker from `knet broker provision`, which binds each session to its
    # username: the ingest and split connections log in as <username>.ingest/.split (a
    # certificate trainer: <cert dir>/<connection>/<cert name>), never under the main name.
    connection_accounts: bool = False

    def connection(self, name: str | None) -> MqttEndpoint:
        """The endpoint of one of the trainer's connections (None: the main one). Another
        connection never inherits the main one's client id or session settings."""
        if name is None:
            return self
        if self.connection_accounts:
            return self.for_connection(name)
        return self.model_copy(update={"client_id": None})

    def connection_username(self, connection: str | None) -> str | None:
        """The username of one of the trainer's connections (None: the main one)."""
        return self.connection(connection).username


class ModelSection(BaseModel):
    """A model the trainer supervises and the profiles its updates are exported for.

    ``zoo`` (default ``digits``) or ``factory`` (``package.module:factory``, with optional
    ``weights`` relative to this file): exactly one. A factory is imported and called at
    load time, so a wrong path, return type, shape or weights file fails here
    (``cloud_trainer.models.zoo.refs``). ``input_shape`` and ``cuts`` apply to a factory that
    returns a plain module (cut at traced candidates, ``cloud_trainer.models.cuts``).
    """

    model_config = _STRICT

    zoo: str | None = None
    factory: str | None = Field(None, description="package.module:factory")
    weights: Path | None = Field(None, description="torch state dict for the factory's model")
    input_shape: list[int] | None = Field(None, description="C,H,W when the model cannot say")
    cuts: str | list[str] = Field("modules", description="cut selection for a plain module")
    seed: int = Field(0, ge=0)
    profiles: list[str] = Field(default_factory=lambda: ["x86-dev"], min_length=1,
                                description="firmware profiles to export each update for")

    _paths = field_validator("weights")(resolve_path)

    @field_validator("zoo")
    @classmethod
    def _zoo(cls, v: str | None) -> str | None:
        from cloud_trainer.models.zoo import zoo_names

        if v is not None and v not in zoo_names():
            raise ValueError(f"no zoo model {v!r}; choose from {', '.join(zoo_names())}")
        return v

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str | None) -> str | None:
        from cloud_trainer.models.zoo.refs import ModelRef, ModelRefError

        if v is not None:
            try:
                if ModelRef.parse(v).zoo is not None:
                    raise ModelRefError(f"{v!r} is a zoo name: use zoo = {v!r}")
            except ModelRefError as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _source(self) -> ModelSection:
        if self.zoo is not None and self.factory is not None:
            raise ValueError("give zoo or factory, not both")
        if self.factory is None:
            if self.zoo is None:
                self.zoo = "digits"
            for key in ("weights", "input_shape", "cuts"):
                if key in self.model_fields_set:
                    raise ValueError(f"{key}: only for a factory model (a zoo model has "
                                     "its own blocks and trained weights)")
            return self
        from cloud_trainer.models.zoo.refs import ModelRefError

        try:
            self.load_pair()  # import, call, check shapes and weights now, not mid-run
        except ModelRefError as exc:
            field = "weights" if str(exc).startswith("weights ") else "factory"
            raise ValueError(f"{field}: {exc}") from None
        except ValueError as exc:  # a cut selection that does not fit (CutError)
            raise ValueError(f"cuts: {exc}") from None
        return self

    @property
    def ref(self) -> str:
        """The model reference: the zoo name or the factory's import path."""
        return str(self.factory or self.zoo)

    def load_pair(self) -> ModelPair:
        """The pair this section stands for: the trained zoo pair (cached), or the
        factory's models with ``weights`` loaded (its version 1, no training on labels)."""
        if self.factory is None:
            from cloud_trainer.training.train import trained_pair

            return trained_pair(str(self.zoo), seed=self.seed)
        from cloud_trainer.models.zoo.refs import resolve_pair

        return resolve_pair(self.factory, seed=self.seed, weights=self.weights,
                            input_shape=self.input_shape, cuts=self.cuts)

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, v: list[str]) -> list[str]:
        from agent.infer.profiles import load_profile

        for name in v:
            try:
                load_profile(name)
            except (ConfigError, OSError, ValueError) as exc:
                raise ValueError(f"profile {name!r}: {exc}") from None
        if len(set(v)) != len(v):
            raise ValueError(f"profile listed twice: {v}")
        return v


class StoreSection(BaseModel):
    model_config = _STRICT

    max_age_s: float | None = Field(7 * 24 * 3600.0, gt=0)
    max_bytes: int | None = Field(2 << 30, ge=1)
    device_max_bytes: int | None = Field(256 << 20, ge=1)
    device_max_count: int | None = Field(None, ge=1)


class IngestSection(BaseModel):
    model_config = _STRICT

    enabled: bool = True
    share_group: str = "trainers"
    # Lossless by default: a plain persistent subscription, restored by the broker after a
    # restart; replicas split the fleet by device hash (cloud_trainer/ingest/partition.py). true:
    # the broker's shared subscription, only on a broker that keeps shared sessions across
    # restarts (not Mosquitto 2.0: 579 of 900 lost, docs/deploy.md).
    shared: bool = Field(False, description="true: $share group (see docs/deploy.md first)")
    replicas: int = Field(1, ge=1, le=1024, description="trainer replicas splitting the fleet")
    replica: int = Field(0, ge=0, description="this replica's index, 0 .. replicas-1")
    receive_maximum: int = Field(1000, ge=1, le=65535)
    max_payload: int = Field(4 << 20, ge=1)
    validation: Literal["decode", "header"] = "decode"

    @field_validator("share_group")
    @classmethod
    def _group(cls, v: str) -> str:
        return validate_id(v, "share group")

    @model_validator(mode="after")
    def _split(self) -> IngestSection:
        if self.replica >= self.replicas:
            raise ValueError(f"replica {self.replica}: must be below replicas "
                             f"({self.replicas}), counting from 0")
        if self.shared and self.replicas > 1:
            raise ValueError("shared = true and replicas > 1 both split the stream: pick one")
        return self


class GateSection(BaseModel):
    model_config = _STRICT

    metric: Literal["auto", "accuracy", "teacher_agreement"] = Field(
        "auto", description="auto: accuracy with a labelled holdout, else teacher agreement")
    margin: float = Field(0.0, ge=0, description="points the candidate may lose")
    min_improvement: float | None = Field(
        None, description="points the candidate must gain (None: not required)")
    holdout: Path | None = Field(
        None, description="npz with x (raw inputs) and y (labels) from the operator")
    holdout_fraction: float = Field(0.2, gt=0, lt=1,
                                    description="stored samples kept out of training")
    per_device: bool = Field(
        False, description="also reject a candidate that loses more than the margin on any "
                           "one device's held-out samples (the pooled score can hide it)")
    device_min_samples: int = Field(
        10, ge=1, description="fewest held-out samples of a device for its own check")
    device_alpha: float = Field(
        0.1, gt=0, le=1, description="a device's loss must also be significant: one-sided "
                                     "exact McNemar test, p below this (1: any loss)")

    _paths = field_validator("holdout")(resolve_path)


class TrainingSection(BaseModel):
    model_config = _STRICT

    epochs: int = Field(20, ge=1, le=10_000)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    temperature: float = Field(4.0, gt=0)
    max_samples: int = Field(20_000, ge=1, description="newest samples used per run")
    balance: Literal["newest", "per_device"] = Field(
        "newest", description="'per_device': max_samples shared fairly between the devices "
                              "that uplinked (each keeps its newest), so a busy camera "
                              "does not crowd out a quiet one")
    blocks: list[int] | None = Field(None, description="blocks allowed to change (None: all)")
    raw_input_mode: Literal["student", "student+boundary"] = Field(
        "student+boundary", description="how boundary-0 samples supervise the chain")
    batch_norm: Literal["train", "frozen"] = Field(
        "train", description="'frozen': batch norms keep their running statistics while the "
                             "rest trains (pretrained-derived students, small correlated "
                             "batches from a few cameras)")
    seed: int = 0
    mode: Literal["blockwise-kt", "backprop", "pipelined", "synthetic-gradients"] = Field(
        "blockwise-kt", description="'blockwise-kt': label-free, from the teacher (the "
                                    "default); the others train from operator labels "
                                    "(docs/training.md): end-to-end backprop in one process, "
                                    "or the blocks on `workers` torchrun processes, pipelined "
                                    "(GPipe) or decoupled by synthetic gradients")
    workers: int = Field(1, ge=1, le=64, description="worker processes (pipelined, "
                                                     "synthetic-gradients)")
    m_replay: int = Field(0, ge=0, le=1024, description="synthetic-gradients: each M block "
                          "keeps the last m_replay true gradients that came back and "
                          "relearns from them (docs/benchmarks.md: 8 closes the gap to "
                          "backprop where M blocks do the training; it costs worker CPU)")
    m_replay_steps: int = Field(0, ge=0, le=64, description="synthetic-gradients: extra M "
                                "block steps on replayed gradients per gradient that arrives")
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="where the from-labels modes train: 'cpu' (gloo between workers) "
                           "or 'cuda' (NCCL, one GPU per worker: a node needs as many GPUs "
                           "as it runs workers)")

    @model_validator(mode="after")
    def _workers(self) -> TrainingSection:
        if self.workers > 1 and self.mode not in ("pipelined", "synthetic-gradients"):
            raise ValueError(f"workers = {self.workers}: only for mode = pipelined or "
                             "synthetic-gradients")
        if (self.m_replay or self.m_replay_steps) and self.mode != "synthetic-gradients":
            raise ValueError("m_replay / m_replay_steps: only for mode = synthetic-gradients")
        if self.m_replay_steps and not self.m_replay:
            raise ValueError(f"m_replay_steps = {self.m_replay_steps} needs m_replay >= 1 "
                             "(gradients to replay)")
        if self.device != "cpu" and self.mode == "blockwise-kt":
            raise ValueError(f"device = {self.device!r}: only for mode = backprop, pipelined "
                             "or synthetic-gradients (blockwise-kt trains on the CPU)")
        return self


class JobSection(BaseModel):
    """One scheduled retraining job: which model, which devices, when, and how."""

    model_config = _STRICT

    id: str
    model: str
    profiles: list[str] = Field(default_factory=list, description="device group by profile")
    devices: list[str] = Field(default_factory=list, description="device group by id")
    interval_s: float | None = Field(None, gt=0)
    cron: str | None = Field(None, description="crontab expression, e.g. '0 3 * * *'")
    min_new_samples: int = Field(100, ge=1)
    boundaries: list[int] | None = Field(None, description="boundaries to train on (None: any)")
    misfire_grace_s: int = Field(300, ge=1)
    training: TrainingSection = TrainingSection()
    gate: GateSection = GateSection()

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return validate_id(v, "job id")

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: list[str]) -> list[str]:
        return [validate_id(d) for d in v]

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None:
            from apscheduler.triggers.cron import CronTrigger

            CronTrigger.from_crontab(v)  # raises ValueError naming the bad field
        return v

    @model_validator(mode="after")
    def _one_trigger(self) -> JobSection:
        if (self.interval_s is None) == (self.cron is None):
            raise ValueError("give exactly one of interval_s or cron")
        return self


class RolloutSection(BaseModel):
    model_config = _STRICT

    enabled: bool = True
    canary_devices: list[str] = Field(default_factory=list,
                                      description="explicit canary group (else a fraction)")
    canary_fraction: float = Field(0.25, gt=0, le=1)
    success_timeout_s: float = Field(300.0, gt=0)
    required_success_ratio: float = Field(1.0, gt=0, le=1)

    @field_validator("canary_devices")
    @classmethod
    def _devices(cls, v: list[str]) -> list[str]:
        return [validate_id(d) for d in v]

    def canary_count(self, eligible: int) -> int:
        return min(eligible, max(1, math.ceil(self.canary_fraction * eligible)))


class SplitSection(BaseModel):
    model_config = _STRICT

    enabled: bool = False
    model: str | None = Field(None, description="which [models.*] to serve (default: first)")
    workers: int = Field(2, ge=1, le=64)


class AdaptSection(BaseModel):
    """Moving devices' cuts from their live link figures (``cloud_trainer/plan/adaptive.py``)."""

    model_config = _STRICT

    enabled: bool = False
    model: str | None = Field(None, description="which [models.*] (default: first)")
    network: Path | None = Field(None, description="network.toml: the device node first, "
                                                   "the cloud last, bench = record files")
    devices: list[str] = Field(default_factory=list, description="devices whose cut moves")
    margin: float = Field(0.2, ge=0, lt=1)
    sustain: int = Field(3, ge=1)

    _paths = field_validator("network")(resolve_path)

    @field_validator("devices")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        return [validate_id(d) for d in v]

    @model_validator(mode="after")
    def _complete(self) -> AdaptSection:
        if self.enabled and (self.network is None or not self.devices):
            raise ValueError("adapt.enabled needs adapt.network and adapt.devices")
        return self


class TrainerMetricsSection(BaseModel):
    """The Prometheus endpoint (``cloud_trainer/metrics.py``); no port: none is served."""

    model_config = _STRICT

    prometheus_port: int | None = Field(None, ge=0, le=65535, description="0: any free port")
    prometheus_bind: str = "127.0.0.1"


class TrainerConfig(BaseModel):
    model_config = _STRICT

    trainer: TrainerSection
    mqtt: MqttSection = MqttSection()
    models: dict[str, ModelSection] = Field(min_length=1)
    store: StoreSection = StoreSection()
    ingest: IngestSection = IngestSection()
    jobs: list[JobSection] = Field(default_factory=list)
    rollout: RolloutSection = RolloutSection()
    split: SplitSection = SplitSection()
    adapt: AdaptSection = AdaptSection()
    # PostgreSQL for the store, registry, run log and job store (none: SQLite in state_dir).
    database: DatabaseSection = DatabaseSection()
    metrics: TrainerMetricsSection = TrainerMetricsSection()
    console: ConsoleSection = ConsoleSection()  # the web console (docs/console.md)

    @field_validator("models")
    @classmethod
    def _model_ids(cls, v: dict[str, ModelSection]) -> dict[str, ModelSection]:
        import re

        for name in v:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", name):
                raise ValueError(f"model id {name!r}: lowercase a-z, 0-9, '_', '.', '-'")
        return v

    @model_validator(mode="after")
    def _references(self) -> TrainerConfig:
        ids = [j.id for j in self.jobs]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"job ids must be unique: {sorted(dup)}")
        for j in self.jobs:
            if j.model not in self.models:
                raise ValueError(f"job {j.id!r}: model {j.model!r} is not in [models] "
                                 f"({', '.join(self.models)})")
        if self.split.model is not None and self.split.model not in self.models:
            raise ValueError(f"split.model {self.split.model!r} is not in [models]")
        if self.adapt.model is not None and self.adapt.model not in self.models:
            raise ValueError(f"adapt.model {self.adapt.model!r} is not in [models]")
        return self

    @property
    def topics(self) -> Topics:
        return Topics(self.trainer.fleet, self.trainer.topic_prefix)

    def job(self, job_id: str) -> JobSection:
        for j in self.jobs:
            if j.id == job_id:
                return j
        raise ConfigError(f"no job {job_id!r} in the config ({', '.join(self.job_ids) or '-'})")

    @property
    def job_ids(self) -> list[str]:
        return [j.id for j in self.jobs]

    # state directory layout
    @property
    def store_dir(self) -> Path:
        return self.trainer.state_dir / "store"

    @property
    def registry_dir(self) -> Path:
        return self.trainer.state_dir / "registry"

    @property
    def jobs_db(self) -> Path:
        return self.trainer.state_dir / "jobs.sqlite3"

    @property
    def lock_file(self) -> Path:
        return self.trainer.state_dir / "scheduler.lock"


def load_trainer_config(path: Path | str) -> TrainerConfig:
    """Read and validate ``trainer.toml``; ConfigError names file, field and reason."""
    path = Path(path)
    return load_model(path, TrainerConfig, context={"base_dir": path.resolve().parent})

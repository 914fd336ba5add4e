"""Block benchmark records: what the partition planner knows about a node (Scission).

``measure`` times every block of a partition on the node's own onnxruntime session
(``BlockRunner``, so the profile's providers and thread counts apply), after warm-up, over
``repeats`` runs per block at batch 1, and reports the median and p95. For every boundary
the partition produces or receives it encodes real activations with each codec and records
the encoded bytes, encode/decode time and, where the partition holds the rest of the model,
the top-1 agreement lost by decoding (the codec's accuracy loss). The result is a
``BenchRecord``: JSON on disk, published on the device's ``bench`` topic, and read by the
trainer's store and the planner (``cloud_trainer.plan``). No torch here: the device runs it.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.compat import zip_strict
from agent.errors import KnetAgentError
from agent.infer.manifest import PartitionManifest, Shape
from agent.wire.codec import CodecError, decode, encode, get_codec, parse_spec

log = logging.getLogger(__name__)

# raw fp32 (the baseline), DEFER's zfp-reversible + LZ4, and knet's lossy codecs.
DEFAULT_CODECS = ("raw", "defer", "fp16+lz4", "uint8+lz4", "uint8:per_channel=1+lz4",
                  "zfp:precision=12")
MAX_RECORD_BYTES = 4 * 2**20  # a 50-block model with 10 codecs is ~100 kB


class BenchRecordError(KnetAgentError, ValueError):
    """A benchmark record that cannot be used; the text says why."""


class BlockTiming(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=1)
    median_s: float = Field(ge=0)
    p95_s: float = Field(ge=0)
    repeats: int = Field(ge=1)
    file_bytes: int = Field(ge=0)
    params: int = Field(0, ge=0)


class CodecMeasure(BaseModel):
    """One codec on one boundary, per sample (batch 1, as the agent sends it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    boundary: int = Field(ge=0)
    codec: str
    raw_bytes: int = Field(ge=0)
    bytes: float = Field(ge=0, description="mean encoded frame size")
    encode_s: float = Field(ge=0, description="median encode time")
    decode_s: float = Field(ge=0, description="median decode time")
    max_abs_err: float = Field(ge=0)
    rel_rmse: float = Field(ge=0, description="RMS error / RMS of the activation")
    lossless: bool
    accuracy_loss: float | None = Field(
        None, description="top-1 agreement points lost (100 - agreement %); None when this "
                          "node does not hold the rest of the model")


class BenchRecord(BaseModel):
    """Everything the planner needs from one node for one model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    device: str
    profile: str
    onnxruntime: str = Field(description="the onnxruntime actually running the blocks")
    providers: tuple[str, ...]
    machine: str = ""
    model_id: str
    model_version: int = Field(ge=1)
    role: Literal["student", "teacher"] = "student"
    num_blocks: int = Field(ge=1)
    boundaries: tuple[Shape, ...]
    first: int = Field(ge=1)
    last: int = Field(ge=1)
    warmup: int = Field(ge=0)
    repeats: int = Field(ge=1)
    samples: int = Field(ge=1)
    inputs: Literal["source", "generated"] = "source"
    blocks: tuple[BlockTiming, ...]
    codecs: tuple[CodecMeasure, ...] = ()
    spool_append_s: float | None = Field(
        None, ge=0, description="median durable spool append + ack of one message: what "
                                "every relayed activation costs the sender before it is sent")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @model_validator(mode="after")
    def _consistent(self) -> BenchRecord:
        if len(self.boundaries) != self.num_blocks + 1:
            raise ValueError(f"{len(self.boundaries)} boundaries for {self.num_blocks} blocks")
        idx = [b.index for b in self.blocks]
        if idx != list(range(self.first, self.last + 1)) or self.last > self.num_blocks:
            raise ValueError(f"blocks {idx} are not {self.first}..{self.last} of "
                             f"{self.num_blocks}")
        for c in self.codecs:
            if c.boundary > self.num_blocks:
                raise ValueError(f"codec measure at boundary {c.boundary} > {self.num_blocks}")
        return self

    def block(self, index: int) -> BlockTiming:
        return self.blocks[index - self.first]

    def codec_at(self, boundary: int, codec: str) -> CodecMeasure | None:
        for c in self.codecs:
            if c.boundary == boundary and c.codec == codec:
                return c
        return None

    # --- wire and files
    def to_json(self) -> bytes:
        return self.model_dump_json(indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes | str, *, max_bytes: int = MAX_RECORD_BYTES) -> BenchRecord:
        """Parse untrusted bytes; BenchRecordError (only) on anything wrong."""
        if len(data) > max_bytes:
            raise BenchRecordError(f"record of {len(data)} bytes exceeds {max_bytes}")
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<root>"
            raise BenchRecordError(f"invalid bench record: {where}: {first['msg']} "
                                   f"({exc.error_count()} error(s))") from None

    @classmethod
    def load(cls, path: Path | str) -> BenchRecord:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BenchRecordError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            return cls.from_json(data)
        except BenchRecordError as exc:
            raise BenchRecordError(f"{path}: {exc}") from None

    def dump(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(self.to_json() + b"\n")
        tmp.replace(path)
        return path


def _p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def time_blocks(runner: object, x: np.ndarray, *, warmup: int, repeats: int
                ) -> tuple[list[BlockTiming], list[np.ndarray]]:
    """Per-block median/p95 at batch 1 on real inputs; also the boundary activations.

    Repeats cycle through the inputs, so a block is not timed on one cached tensor only.
    """
    m = runner.manifest  # type: ignore[attr-defined]
    acts = [x] + [np.concatenate(a) for a in zip_strict(
        *(runner.run(x[i:i + 1], checked=True) for i in range(len(x))))]  # type: ignore[attr-defined]
    rows = []
    for entry in m.blocks:
        inputs = acts[entry.index - m.first]
        for i in range(warmup):
            runner.run_block(entry.index, inputs[i % len(inputs)][None])  # type: ignore[attr-defined]
        times = []
        for i in range(repeats):
            xi = inputs[i % len(inputs)][None]
            t0 = time.perf_counter()
            runner.run_block(entry.index, xi)  # type: ignore[attr-defined]
            times.append(time.perf_counter() - t0)
        rows.append(BlockTiming(index=entry.index, median_s=statistics.median(times),
                                p95_s=_p95(times), repeats=repeats, file_bytes=entry.size,
                                params=entry.params))
    return rows, acts


def _rest(runner: object, boundary: int, a: np.ndarray) -> np.ndarray:
    """Run the partition's blocks after ``boundary`` on ``a`` (batch), one sample at a time."""
    out = []
    for i in range(len(a)):
        y = a[i:i + 1]
        for index in range(boundary + 1, runner.manifest.last + 1):  # type: ignore[attr-defined]
            y = runner.run_block(index, y)  # type: ignore[attr-defined]
        out.append(y)
    return np.concatenate(out)


def measure_codec(runner: object, boundary: int, acts: np.ndarray, spec: str,
                  reference: np.ndarray | None) -> CodecMeasure:
    """Encode every sample on its own; decode; compare; optionally finish the model."""
    frames, enc, dec, decoded = [], [], [], []
    for i in range(len(acts)):
        t0 = time.perf_counter()
        frame = encode(acts[i:i + 1], spec)
        t1 = time.perf_counter()
        d = decode(frame)
        t2 = time.perf_counter()
        frames.append(len(frame))
        enc.append(t1 - t0)
        dec.append(t2 - t1)
        decoded.append(d)
    out = np.concatenate(decoded)
    err = out.astype(np.float64) - acts
    rms = float(np.sqrt(np.mean(np.square(acts, dtype=np.float64)))) or 1.0
    loss = None
    if reference is not None:  # the partition ends with the model's output: finish it
        pred = _rest(runner, boundary, out).argmax(1)
        loss = float(100.0 - (pred == reference).mean() * 100.0)
    parsed = parse_spec(spec)
    return CodecMeasure(
        boundary=boundary, codec=str(parsed), raw_bytes=int(acts[0].nbytes),
        bytes=float(np.mean(frames)), encode_s=statistics.median(enc),
        decode_s=statistics.median(dec), max_abs_err=float(np.abs(err).max()),
        rel_rmse=float(np.sqrt(np.mean(np.square(err)))) / rms,
        lossless=get_codec(parsed.name).is_lossless(parsed), accuracy_loss=loss)


def measure(runner: object, x: np.ndarray, *, device: str, codecs: tuple[str, ...] =
            DEFAULT_CODECS, warmup: int = 5, repeats: int = 30,
            inputs: Literal["source", "generated"] = "source",
            spool_dir: Path | None = None) -> BenchRecord:
    """The benchmark record of ``runner`` (a ``BlockRunner``) on the inputs ``x`` (batch)."""
    import onnxruntime as ort

    if len(x) == 0:
        raise ValueError("no inputs to benchmark with")
    specs = tuple(dict.fromkeys(str(parse_spec(c)) for c in codecs))  # SpecError early
    m: PartitionManifest = runner.manifest  # type: ignore[attr-defined]
    timings, acts = time_blocks(runner, x, warmup=warmup, repeats=repeats)
    complete_tail = m.last == m.num_blocks
    reference = acts[-1].argmax(1) if complete_tail else None
    measures = []
    for offset, a in enumerate(acts[:-1] if complete_tail else acts):
        boundary = m.first - 1 + offset
        for spec in specs:
            try:
                measures.append(measure_codec(runner, boundary, a, spec, reference))
            except CodecError as exc:  # e.g. zfp on an unsupported shape: skip, say why
                log.warning("codec %s on boundary %d: %s", spec, boundary, exc)
    profile = runner.profile  # type: ignore[attr-defined]
    return BenchRecord(
        device=device, profile=profile.name, onnxruntime=ort.__version__,
        providers=tuple(runner.providers),  # type: ignore[attr-defined]
        machine=f"{platform.node()} {platform.machine()}", model_id=m.model_id,
        model_version=m.model_version, role=m.role, num_blocks=m.num_blocks,
        boundaries=m.boundaries, first=m.first, last=m.last, warmup=warmup,
        repeats=repeats, samples=len(x), inputs=inputs, blocks=tuple(timings),
        codecs=tuple(measures),
        spool_append_s=measure_spool(spool_dir) if spool_dir is not None else None)


def measure_spool(directory: Path, nbytes: int = 16 * 1024, n: int = 50) -> float:
    """Median seconds to append one message to a fresh spool in ``directory`` and ack it
    (the agent's at-least-once path: every relayed activation pays it)."""
    import tempfile

    from agent.mqtt.spool import Spool

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix="bench-spool-") as tmp:
        spool = Spool(Path(tmp), 64 * 2**20)
        payload = bytes(nbytes)
        times = []
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                spool.append("knet/v1/bench/x/act", payload, 1)
                times.append(time.perf_counter() - t0)
                for rec in spool.peek(1, 0):
                    spool.ack(rec.id)
        finally:
            spool.close()
    return statistics.median(times)


def generated_inputs(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) inputs, for a node whose source cannot be replayed (an MQTT feed)."""
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def source_inputs(cfg: object, shape: tuple[int, ...], n: int) -> np.ndarray | None:
    """Up to ``n`` inputs from the agent's own replayable source (npz / images), or None."""
    from agent.config import ImagesSource, NpzSource
    from agent.infer.sources import BadInputs, make_source

    src_cfg = cfg.source  # type: ignore[attr-defined]
    if not isinstance(src_cfg, (NpzSource, ImagesSource)):
        return None
    src_cfg = src_cfg.model_copy(update={"rate_hz": 0.0, "loop": False})
    xs = []
    for sample in make_source(src_cfg, shape, BadInputs()):
        xs.append(sample.x)
        if len(xs) >= n:
            break
    return np.stack(xs) if xs else None


BENCH_CONNECTION = "bench"  # broker/provision.py DEVICE_CONNECTIONS


def publish_record(cfg: object, record: BenchRecord, timeout: float = 10.0) -> None:
    """Publish ``record`` (QoS 1, retained) on the device's ``bench`` topic and wait for
    the PUBACK. It logs in as ``<device>.bench`` (provisioned with every device): the broker
    binds a session to its username, so the device's own name would take over the running
    daemon's session. A certificate device uses the ``bench/`` certificate beside its own."""
    from agent.mqtt.client import make_client
    from agent.mqtt.endpoint import MqttEndpoint

    device = cfg.device.id  # type: ignore[attr-defined]
    # A clean, short-lived session (MqttEndpoint's defaults), not the daemon's persistent one.
    bench = cfg.mqtt.for_connection(BENCH_CONNECTION).derive(MqttEndpoint)  # type: ignore[attr-defined]
    client = make_client(bench, default_client_id=bench.username or "").start()
    try:
        if not client.wait_connected(timeout):
            raise ConnectionError(f"no connection to {bench.describe()} within {timeout:g} s")
        info = client.publish(cfg.topics.bench(device), record.to_json(), qos=1,  # type: ignore[attr-defined]
                              retain=True)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError(f"no PUBACK for the bench record within {timeout:g} s")
    finally:
        client.stop()


def cli_main(argv: list[str]) -> int:
    """``knet-agent benchmark --config agent.toml [--out FILE] [--publish]``."""
    import argparse
    import json
    import sys

    from agent.config import load_config
    from agent.configfile import ConfigError
    from agent.infer.profiles import load_profile
    from agent.infer.runtime import BlockRunner, PartitionError

    p = argparse.ArgumentParser(prog="knet-agent benchmark",
                                description="time every block and codec of this partition")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None, help="write the record here (JSON)")
    p.add_argument("--publish", action="store_true", help="publish it on the bench topic")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--codecs", nargs="+", default=None,
                   help="codec specs (default: raw, defer, knet's codecs and the uplink's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        cfg = load_config(args.config)
        profile = load_profile(cfg.model.profile, [cfg.model.profiles_dir])
        runner = BlockRunner(PartitionManifest.load(cfg.model.manifest),
                             cfg.model.manifest.parent, profile)
    except (ConfigError, PartitionError, ValueError) as exc:
        print(f"knet-agent benchmark: {exc}", file=sys.stderr)
        return 2
    x = source_inputs(cfg, runner.input_shape, args.samples)
    kind: Literal["source", "generated"] = "source"
    if x is None:
        x, kind = generated_inputs(runner.input_shape, args.samples), "generated"
    codecs = tuple(args.codecs or (*DEFAULT_CODECS, cfg.uplink.codec))
    try:
        record = measure(runner, x, device=cfg.device.id, codecs=codecs, warmup=args.warmup,
                         repeats=args.repeats, inputs=kind, spool_dir=cfg.device.state_dir)
    except (CodecError, ValueError) as exc:
        print(f"knet-agent benchmark: {exc}", file=sys.stderr)
        return 2
    for b in record.blocks:
        print(f"block {b.index}: median {b.median_s * 1e3:.3f} ms, p95 {b.p95_s * 1e3:.3f} ms")
    for c in record.codecs:
        loss = "-" if c.accuracy_loss is None else f"{c.accuracy_loss:.2f}"
        print(f"boundary {c.boundary} {c.codec}: {c.bytes:.0f} B (raw {c.raw_bytes}), "
              f"loss {loss}")
    if args.out:
        record.dump(args.out)
        print(f"wrote {args.out}")
    if args.publish:
        try:
            publish_record(cfg, record)
        except (OSError, TimeoutError, ConfigError) as exc:
            print(f"knet-agent benchmark: cannot publish: {exc}", file=sys.stderr)
            return 1
        print(f"published on {cfg.topics.bench(cfg.device.id)}")
    if not args.out and not args.publish:
        print(json.dumps(json.loads(record.to_json())))
    return 0

"""``knet plan`` (rank partitions) and ``knet plan bench`` (benchmark a model here: a zoo
name or an import path, optionally cut at traced candidates with ``--cuts``)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_trainer.models.modelref import model_ref

if TYPE_CHECKING:
    from cloud_trainer.plan.solver import Plan, Problem


def _pair(text: str, kind: type = str) -> tuple[object, object]:
    left, sep, right = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return left, kind(right)


def _block_node(text: str) -> tuple[int, str]:
    block, node = _pair(text)
    try:
        return int(str(block)), str(node)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BLOCK=NODE") from None


def model_source_args(p: argparse.ArgumentParser) -> None:
    """``--weights``, ``--input-shape`` and ``--cuts``: how an import-path model is built."""
    p.add_argument("--weights", type=Path, default=None,
                   help="state dict for an import-path model")
    p.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="input shape when the factory's model cannot say")
    p.add_argument("--cuts", default=None, metavar="SPEC",
                   help="cut at traced candidates (`knet cuts`): all, modules[:D], a "
                        "block count N[:D], or candidate names/indices")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("plan", help="rank partitions of a model over a chain of nodes")
    p.add_argument("--model", type=model_ref, help="zoo name or package.module:factory; "
                   "the records must be of its id")
    model_source_args(p)
    p.add_argument("--bench", type=Path, nargs="+", default=[], help="BenchRecord JSON files")
    p.add_argument("--network", type=Path, help="network.toml")
    p.add_argument("--objective", choices=["latency", "throughput", "energy"],
                   default="latency")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--min-device-blocks", type=int, default=None)
    p.add_argument("--pin", type=_block_node, action="append", default=[],
                   metavar="BLOCK=NODE")
    p.add_argument("--forbid", type=_block_node, action="append", default=[],
                   metavar="BLOCK=NODE")
    p.add_argument("--max-upload-bytes", type=lambda t: _pair(t, int), action="append",
                   default=[], metavar="NODE=BYTES", help="per link leaving NODE (* = all)")
    p.add_argument("--max-node-time", type=lambda t: _pair(t, float), action="append",
                   default=[], metavar="NODE=SECONDS")
    p.add_argument("--accuracy-budget", type=float, default=None,
                   help="top-1 points a codec may cost per boundary")
    p.add_argument("--codecs", nargs="+", default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--deploy", type=Path, default=None,
                   help="write a manifest + block files per node of every ranked plan")
    p.add_argument("--export", type=Path, default=None,
                   help="an existing whole-model export for --deploy (else export per node)")
    p.set_defaults(func=run_plan)
    psub = p.add_subparsers(dest="plan_command")
    b = psub.add_parser("bench", help="benchmark a zoo model's blocks here (a BenchRecord)")
    b.add_argument("--model", dest="bench_model", type=model_ref, required=True,
                   help="zoo name or package.module:factory")
    model_source_args(b)
    b.add_argument("--profile", required=True)
    b.add_argument("--role", choices=["student", "teacher", "both"], default="student")
    b.add_argument("--out", type=Path, required=True,
                   help="record file (with --role both: {role} in the name, or a suffix)")
    b.add_argument("--device", default=None, help="the record's device name (default: host)")
    b.add_argument("--samples", type=int, default=32)
    b.add_argument("--repeats", type=int, default=30)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from agent.infer.blockbench import DEFAULT_CODECS
    from cloud_trainer.models.cuts import CutError
    from cloud_trainer.models.zoo.refs import ModelRefError
    from cloud_trainer.plan.localbench import bench_model

    roles = ["student", "teacher"] if args.role == "both" else [args.role]
    for role in roles:
        try:
            rec = bench_model(args.bench_model.text, args.profile, role=role, seed=args.seed,
                              samples=args.samples, repeats=args.repeats,
                              codecs=DEFAULT_CODECS, device=args.device, weights=args.weights,
                              input_shape=args.input_shape, cuts=args.cuts)
        except (ModelRefError, CutError) as exc:
            print(f"knet plan bench: --model: {exc}", file=sys.stderr)
            return 2
        out = Path(str(args.out).replace("{role}", role))
        if len(roles) > 1 and "{role}" not in str(args.out):
            out = out.with_name(f"{out.stem}-{role}{out.suffix}")
        rec.dump(out)
        total = sum(b.median_s for b in rec.blocks)
        print(f"{role}: {len(rec.blocks)} blocks, {total * 1e3:.3f} ms per input "
              f"(sum of medians), {len(rec.codecs)} codec measures -> {out}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from agent.configfile import ConfigError
    from agent.infer.blockbench import BenchRecord, BenchRecordError
    from cloud_trainer.plan.costs import Overrides, PlanError, build_problem
    from cloud_trainer.plan.network import load_network
    from cloud_trainer.plan.report import plot_plan, write_json
    from cloud_trainer.plan.solver import solve

    if args.network is None:
        print("knet plan: --network is required (or use `knet plan bench`)", file=sys.stderr)
        return 2
    try:
        net = load_network(args.network)
        records = [BenchRecord.load(p) for p in args.bench]
        ov = Overrides(min_device_blocks=args.min_device_blocks,
                       accuracy_budget=args.accuracy_budget, pins=tuple(args.pin),
                       forbids=tuple(args.forbid),
                       max_upload_bytes=tuple(args.max_upload_bytes),
                       max_node_time=tuple(args.max_node_time),
                       codecs=tuple(args.codecs) if args.codecs else None)
        model_id = args.model.model_id if args.model is not None else None
        problem, _recs = build_problem(net, records, model_id, ov)
        plans = solve(problem, args.objective, top=args.top)
    except (ConfigError, BenchRecordError, PlanError, ValueError) as exc:
        print(f"knet plan: {exc}", file=sys.stderr)
        return 2
    if not plans:
        print("knet plan: no plan satisfies the constraints", file=sys.stderr)
        return 1
    print_plans(problem, plans, args.objective)
    extra: dict[str, object] = {"network": str(args.network)}
    if args.deploy:
        from cloud_trainer.models.cuts import CutError
        from cloud_trainer.models.zoo.refs import ModelRefError

        try:
            extra["deploy"] = deploy(problem, plans, net, args)
        except (ModelRefError, CutError) as exc:
            print(f"knet plan: --model: {exc}", file=sys.stderr)
            return 2
    if args.json:
        write_json(args.json, problem, plans, args.objective, extra)
        print(f"wrote {args.json}")
    if args.plot:
        plot_plan(problem, plans, args.plot)
        print(f"wrote {args.plot}")
    return 0


def deploy(problem: object, plans: list, net: object, args: argparse.Namespace
           ) -> list[dict[str, str]]:
    from cloud_trainer.plan.report import write_manifests

    exports: dict[tuple[str, str], Path] = {}
    tmp = tempfile.TemporaryDirectory() if args.export is None else None
    try:
        for node in net.nodes:  # type: ignore[attr-defined]
            key = (node.profile, node.role)
            if key in exports:
                continue
            if args.export is not None:
                exports[key] = args.export
                continue
            if not args.model:
                raise SystemExit("knet plan: --deploy needs --model (a zoo name) or --export")
            from cloud_trainer.models.export import export_for_profile

            d = Path(tmp.name) / f"{node.profile}-{node.role}"  # type: ignore[union-attr]
            export_for_profile(args.model.text, node.profile, d, role=node.role,
                               weights=args.weights, input_shape=args.input_shape,
                               cuts=args.cuts)
            exports[key] = d
        out = []
        for rank, plan in enumerate(plans, 1):
            written = write_manifests(problem, plan, net, args.deploy / f"plan-{rank}",  # type: ignore[arg-type]
                                      exports)
            out.append({k: str(v) for k, v in written.items()})
            print(f"plan #{rank}: " + ", ".join(f"{k} -> {v}" for k, v in written.items()))
        return out
    finally:
        if tmp is not None:
            tmp.cleanup()


def print_plans(p: Problem, plans: list[Plan], objective: str) -> None:
    """The ranked plans as a table (bench/report.py's, like every ``knet`` table)."""
    from bench.report import print_table
    from cloud_trainer.plan.report import placement

    rows = []
    for rank, plan in enumerate(plans, 1):
        m = plan.metrics
        codecs = ", ".join(f"b{c.boundary}:{p.codec_names[c.codec]}" for c in plan.cuts) or "-"
        rows.append((rank, placement(p, plan), codecs, m["latency_s"] * 1e3,
                     m["throughput"], m["bytes"], m["energy_j"] * 1e3, m["loss"]))
    print_table(f"best plans by {objective}", ["#", "placement", "codec per cut",
                                               "latency ms", "throughput /s",
                                               "bytes/inference", "energy mJ",
                                               "Σ accuracy loss"], rows)

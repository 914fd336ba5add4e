"""`knet`: the operator's command line (benchmarks, broker, keys, export, demo, fleet).

Heavy imports (torch, onnxruntime) happen inside each command so that `knet broker ...`
starts fast and works on a machine without the trainer extras.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cloud_trainer.models.modelref import model_ref, zoo_name
from knet_cli.plan import model_source_args

Handler = Callable[[argparse.Namespace], int]


def _bench_codec(args: argparse.Namespace) -> int:
    from bench.codec import run_codec_bench

    run_codec_bench(model=args.model, seed=args.seed, samples=args.samples,
                    json_path=args.json, plot_path=args.plot, codecs=args.codecs)
    return 0


def _bench_runtime(args: argparse.Namespace) -> int:
    from bench.runtime import run_runtime_bench

    run_runtime_bench(model=args.model, seed=args.seed, repeats=args.repeats,
                      json_path=args.json, threads=args.threads)
    return 0


def _bench_agent(args: argparse.Namespace) -> int:
    from bench.agent import run_agent_bench

    run_agent_bench(model=args.model, frames=args.frames, repeats=args.repeats,
                    json_path=args.json, codec=args.codec, distinct=args.distinct,
                    batch_sizes=args.batch_sizes, profile_dir=args.profile)
    return 0


def _bench_distill(args: argparse.Namespace) -> int:
    if args.model == "effnet-lite0" and args.headroom is not None:
        from bench.distill_headroom import run_headroom

        run_headroom(block=args.headroom, steps=args.steps or 1500,
                     seed=(args.seeds or [0])[0], json_path=args.json)
        return 0
    if args.model == "effnet-lite0":
        from bench.distill_scenes import STEPS, run_scene_distill_bench

        run_scene_distill_bench(seeds=tuple(args.seeds or (0, 1, 2)),
                                steps=args.steps or STEPS, json_path=args.json,
                                plot_path=args.plot)
        return 0
    from bench.distill import run_distill_bench

    run_distill_bench(seeds=tuple(args.seeds or (0, 1, 2, 3, 4)), transfer=args.transfer,
                      steps=args.steps or 600,
                      json_path=args.json, plot_path=args.plot, sweep=tuple(args.sweep))
    return 0


def _bench_disagg(args: argparse.Namespace) -> int:
    from bench.disagg import run_disagg_bench

    run_disagg_bench(seeds=tuple(args.seeds), steps=args.steps, workers=tuple(args.workers),
                     json_path=args.json, plot_path=args.plot)
    return 0


def _bench_fleet(args: argparse.Namespace) -> int:
    from bench.fleet import COLUMNS, main_rows, run_fleet_bench
    from bench.report import command_line, print_table, write_json

    results = []
    for n in args.devices:
        results.append(run_fleet_bench(n, duration_s=args.duration, rate_hz=args.rate,
                                       codec=args.codec, update=not args.no_update,
                                       per_worker=args.per_worker))
        print_table(f"fleet: {n} devices x {args.rate:g} envelopes/s for {args.duration:g} s",
                    COLUMNS, main_rows(results[-1:]))
        for err in results[-1]["errors"]:
            print(f"  {n} devices: {err}")
        write_json(args.json, "fleet", command_line(), results)  # after every run
    print_table("fleet: all runs", COLUMNS, main_rows(results))
    held = [r["devices"] for r in results if r["held"]]
    print(f"largest N held without loss: {max(held) if held else 'none'}")
    return 0 if all(r["held"] for r in results) else 1


def _ingest_source(args: argparse.Namespace, row: dict[str, Any]) -> str:
    """What the publisher sent, for a table's title."""
    shape = tuple(row["shape"])
    if args.model:
        return f"the {args.model} student's boundary {args.boundary} {shape}"
    return f"synthetic activations {shape}"


def _bench_ingest_scale(args: argparse.Namespace) -> int:
    from bench.ingest_scale import run_scale_bench
    from bench.report import command_line, print_table, write_json

    rows = [run_scale_bench(store, n, messages=args.messages, devices=args.devices,
                            validation=args.validation[0], payload_codec=args.codec,
                            model=args.model, boundary=args.boundary)
            for store in (args.store or ["sqlite"]) for n in (args.replicas or [1])]
    print_table(f"ingest: {args.messages} messages from {args.devices} devices, "
                f"{_ingest_source(args, rows[0])}, {args.codec}, "
                f"validation {args.validation[0]}, {rows[0]['cores']} cores",
                ["store", "replicas", "stored msg/s", "lost", "replica CPU us/msg",
                 "postgres CPU us/msg", "broker CPU us/msg", "publisher CPU us/msg",
                 "stored per replica"],
                [(r["store"], r["replicas"], r["messages_per_s"], r["lost"],
                  r["replica_cpu_us_per_msg"], r["postgres_cpu_us_per_msg"],
                  r["broker_cpu_us_per_msg"], r["publisher_cpu_us_per_msg"],
                  "/".join(map(str, r["stored_per_replica"])))
                 for r in rows])
    write_json(args.json, "ingest", command_line(), rows)
    return 0


def _bench_ingest(args: argparse.Namespace) -> int:
    from bench.ingest import run_ingest_bench
    from bench.report import command_line, print_table, write_json

    if args.store or args.replicas:
        if args.page_size:
            print("knet bench ingest: --page-size compares the one-process bench's store; "
                  "the replicas (--store, --replicas) use the default", file=sys.stderr)
            return 2
        return _bench_ingest_scale(args)
    rows = []
    for batch in args.batch:
        for validation in args.validation:
            for page_size in args.page_size or [None]:
                r = run_ingest_bench(messages=args.messages, payload_codec=args.codec,
                                     devices=args.devices, validation=validation,
                                     batch=batch, model=args.model, boundary=args.boundary,
                                     page_size=page_size)
                rows.append({"validation": validation, **r})
    print_table(f"ingest: {args.messages} activation samples from {args.devices} devices, "
                f"{_ingest_source(args, rows[0])}, {args.codec}",
                ["samples per envelope", "validation", "page size", "samples/s", "envelopes/s",
                 "ingest CPU µs/sample", "of it network / writer / checkpoint",
                 "MB/s on the wire", "fp32-equivalent MB/s", "stored", "lost"],
                [(r["batch"], r["validation"], r["page_size"], r["samples_per_s"],
                  r["envelopes_per_s"], r["ingest_cpu_us_per_sample"],
                  " / ".join(f"{r['thread_cpu_us_per_sample'].get(k, 0.0):.1f}"
                             for k in ("network", "writer", "checkpoint")),
                  r["mb_per_s_wire"],
                  r["mb_per_s_float32_equivalent"], r["stored"], r["lost"]) for r in rows])
    write_json(args.json, "ingest", command_line(), rows)
    return 0


def _bench_update(args: argparse.Namespace) -> int:
    from bench.update import run_update_bench

    run_update_bench(devices=tuple(args.devices), changes=tuple(args.changes),
                     rate_hz=args.rate_hz, push_delay=args.push_delay,
                     repeats=args.repeats, json_path=args.json)
    return 0


def _bench_chain(args: argparse.Namespace) -> int:
    from bench.chain import run_chain_bench

    run_chain_bench(frames=args.frames, plan_frames=args.plan_frames, json_path=args.json,
                    stages=tuple(args.stages), model=args.model)
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from cloud_trainer.release.bundle import BundleError, build_device_bundle

    try:
        path = build_device_bundle(args.profile, args.out, arch=args.arch, python=args.python,
                                   tarball=args.tar)
    except BundleError as exc:
        print(f"knet bundle: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _broker(args: argparse.Namespace) -> int:
    from broker import provision

    if args.broker == "provision":
        return _broker_provision_list(args) if args.list_file else _broker_provision(args)
    if args.broker == "revoke":
        return _broker_revoke(args)
    if args.broker == "provision-site":
        return _broker_provision_site(args)
    if args.broker == "certs":
        from broker.certs import DEFAULT_SERVER_NAMES

        names = args.name or DEFAULT_SERVER_NAMES
        for name, path in provision.create_certs(args.dir, names,
                                                 renew_server=args.renew_server).items():
            print(f"{name}: {path}")
        return 0
    return provision.run_foreground(args.dir, args.port, args.tls_port, args.mtls_port,
                                    bind_address=args.bind)


def _broker_provision_site(args: argparse.Namespace) -> int:
    from broker.provision import ProvisionError
    from broker.site import provision_site

    try:
        made = provision_site(args.dir, args.site, args.fleet, args.site_dir,
                              cloud_host=args.cloud_host, cloud_port=args.cloud_port,
                              tls=args.tls, outage_hours=args.outage_hours,
                              rate_msgs_s=args.rate, avg_msg_bytes=args.msg_bytes)
    except (ProvisionError, ValueError) as exc:
        return _usage_error("provision-site", str(exc))
    print(f"site {made.site} of fleet(s) {', '.join(made.fleets)}: bridge to {made.address}")
    print(f"site broker directory: {made.site_dir} (provision its devices there; run it with "
          f"`knet broker run --dir {made.site_dir}`)")
    print(f"outage absorbed: {made.outage_hours:g} h = {made.max_queued_messages} messages, "
          f"{made.max_queued_bytes / 2**20:.0f} MiB queued on the site broker (in memory)")
    print(f"if `knet broker run --dir {args.dir}` runs, the cloud broker reloads its ACL now")
    return 0


def _usage_error(command: str, message: str) -> int:
    print(f"knet broker {command}: {message}", file=sys.stderr)
    return 2


def _broker_provision(args: argparse.Namespace) -> int:
    from broker import provision

    if not args.account or not args.fleet:
        return _usage_error("provision", "give ACCOUNT and --fleet, or --list FILE")
    if args.update_key or args.profiles_dir:
        return _usage_error("provision", "--update-key and --profiles-dir go with --list")
    try:
        if args.trainer:
            creds = provision.provision_trainer(args.dir, args.account, args.fleet,
                                                cert=args.cert, tls=args.tls, host=args.host,
                                                port=args.port)
        else:
            creds = provision.provision_device(args.dir, args.account, args.fleet[0],
                                               cert=args.cert, tls=args.tls, host=args.host,
                                               port=args.port, upstream=args.upstream,
                                               connections=args.connection)
    except (provision.ProvisionError, ValueError) as exc:  # clashes, malformed ids
        return _usage_error("provision", str(exc))
    print(f"# {creds.kind} {creds.username}: credentials in {creds.bundle} (0600)")
    print(creds.snippet)
    return 0


def _broker_provision_list(args: argparse.Namespace) -> int:
    """Exit 2, with nothing written, for a bad list file or a list that clashes with the
    registry; otherwise one line per device (created, updated, unchanged)."""
    from agent.infer.profiles import list_profiles
    from broker.bulk import provision_list
    from broker.devicelist import DeviceListError, load_device_list
    from broker.provision import ProvisionError

    single = [opt for opt, given in (("ACCOUNT", args.account), ("--fleet", args.fleet),
                                     ("--trainer", args.trainer), ("--cert", args.cert),
                                     ("--upstream", args.upstream is not None),
                                     ("--connection", args.connection)) if given]
    if single:
        return _usage_error("provision", f"--list provisions password devices from the file; "
                                         f"{', '.join(single)} apply to one account only")
    try:
        devices = load_device_list(args.list_file, list_profiles(args.profiles_dir))
        outcomes = provision_list(args.dir, devices, host=args.host, port=args.port,
                                  tls=args.tls, update_key=args.update_key)
    except (DeviceListError, ProvisionError) as exc:
        return _usage_error("provision", str(exc))
    for outcome in outcomes:
        print(outcome.describe())
    counts = {s: sum(o.status == s for o in outcomes) for s in ("created", "updated",
                                                                "unchanged")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


def _broker_revoke(args: argparse.Namespace) -> int:
    """Exit 2 for a bad list file or mixed-up fleets, 1 for an unknown id (nothing revoked
    in either case)."""
    from broker.devicelist import DeviceListError, load_revoke_list
    from broker.provision import ProvisionError, UnknownAccountError, revoke_accounts

    if bool(args.account) == bool(args.list_file):
        return _usage_error("revoke", "give the ids to revoke or --list FILE, not both")
    try:
        listed = load_revoke_list(args.list_file) if args.list_file else []
        fleets = {e.id: e.fleet for e in listed if e.fleet is not None}
        done = revoke_accounts(args.dir, [e.id for e in listed] or args.account,
                               fleets=fleets)
    except DeviceListError as exc:
        return _usage_error("revoke", str(exc))
    except UnknownAccountError as exc:
        print(f"knet broker revoke: {exc}", file=sys.stderr)
        return 1
    except ProvisionError as exc:
        return _usage_error("revoke", str(exc))
    for r in done:
        print(f"{'revoked' if r.revoked else 'already revoked'} {r.kind} {r.account}")
    if any(r.revoked for r in done):
        print(f"if `knet broker run --dir {args.dir}` runs, its broker reloads now (SIGHUP); "
              "reload any other broker that reads these files")
    return 0


def _keys_gen(args: argparse.Namespace) -> int:
    from cloud_trainer.release.keys import KeyExistsError, generate_keypair

    try:
        private, public = generate_keypair(args.dir, name=args.name)
    except (KeyExistsError, OSError) as exc:
        print(f"knet keys gen: {exc}", file=sys.stderr)
        return 1
    print(f"private key (keep it on the trainer, never on a device): {private}")
    print(f"public key (list it in every agent's config): {public}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from cloud_trainer.models.cuts import CutError
    from cloud_trainer.models.export import export_for_profile
    from cloud_trainer.models.zoo.refs import ModelRefError

    try:
        manifest = export_for_profile(args.model.text, args.profile, Path(args.out),
                                      seed=args.seed, role=args.role,
                                      model_version=args.version, weights=args.weights,
                                      input_shape=args.input_shape, cuts=args.cuts)
    except (ModelRefError, CutError) as exc:
        print(f"knet export: --model: {exc}", file=sys.stderr)
        return 2
    print(f"exported {len(manifest.blocks)} blocks of {manifest.model_id} "
          f"(IR {manifest.ir_version}, opset {manifest.opset}) to {args.out}/manifest.json")
    return 0


def _cuts(args: argparse.Namespace) -> int:
    import json

    from bench.report import print_table
    from cloud_trainer.models.cuts import CutError, analyse, plot_cuts, select_cuts
    from cloud_trainer.models.zoo.refs import ModelRefError, load_ref

    try:
        loaded = load_ref(args.model, weights=args.weights, input_shape=args.input_shape,
                          trained=False)
        network, shape = loaded.network(args.role)
        analysis = analyse(network, shape)
        chosen = select_cuts(analysis, args.select) if args.select else []
    except (ModelRefError, CutError) as exc:
        print(f"knet cuts: --model: {exc}", file=sys.stderr)
        return 2
    marked = {c.index for c in chosen}
    rows = [("*" if c.index in marked else "", c.index, c.node, c.op, c.module or "-",
             "×".join(map(str, c.shape)), round(c.bytes_fp32 / 1024, 1),
             f"{c.params_before:,}", f"{c.params_after:,}", f"{c.flops_before / 1e6:.3g}",
             f"{c.flops_after / 1e6:.3g}") for c in analysis.cuts]
    print_table(f"{args.model.text} ({args.role}): {len(analysis.cuts)} cut candidates, input "
                f"{'×'.join(map(str, shape))}, {analysis.total_params:,} params, "
                f"{analysis.total_flops / 1e6:.1f} MFLOPs per input",
                ["sel", "#", "node", "op", "module", "boundary", "KiB fp32", "params before",
                 "params after", "MFLOPs before", "MFLOPs after"], rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": args.model.text, "role": args.role, "input_shape": list(shape),
            "output_shape": list(analysis.output_shape),
            "total_params": analysis.total_params, "total_flops": analysis.total_flops,
            "selected": [c.node for c in chosen],
            "cuts": [c.as_dict() for c in analysis.cuts]}, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_cuts(analysis, args.plot, chosen)
        print(f"wrote {args.plot}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from knet_lab.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knet", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = p.add_subparsers(dest="command", required=True)

    _add_bench_commands(sub)
    _add_bundle_commands(sub)
    _add_broker_commands(sub)
    _add_keys_commands(sub)
    _add_model_commands(sub)

    from knet_cli.plan import add_parser as add_plan_parser

    add_plan_parser(sub)  # knet plan [bench] (knet_cli/plan.py)

    from knet_cli.fleet import add_parser as add_fleet_parser

    add_fleet_parser(sub)  # knet fleet list|show|watch (knet_cli/fleet.py)

    d = sub.add_parser("demo", help="a fleet drifts and recovers, end to end on this machine")
    d.set_defaults(func=_demo)
    try:
        from knet_lab.demo import add_arguments as add_demo_arguments
    except ModuleNotFoundError as exc:  # no lab here: `knet demo` says so (main)
        if _top(exc) not in OPTIONAL_PACKAGES:
            raise
    else:
        add_demo_arguments(d)
    return p


# Packages an installation may lack: the trainer image ships neither (Dockerfile).
OPTIONAL_PACKAGES = {"knet_lab": "the lab that `knet demo` runs",
                     "bench": "the benchmarks that `knet bench` runs"}


def _top(exc: ModuleNotFoundError) -> str:
    return (exc.name or "").split(".")[0]


def _add_bench_commands(sub: Any) -> None:
    """``knet bench ...``: the measurements."""
    bench = sub.add_parser("bench", help="measure knet (tables + JSON)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("codec", help="activation codecs on every boundary of a trained model")
    b.add_argument("--model", type=zoo_name, default="digits")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--samples", type=int, default=None, help="inputs to use (default: all/256)")
    b.add_argument("--codecs", nargs="*", default=None, help="codec specs (default: a sweep)")
    b.add_argument("--json", type=Path, default=None)
    b.add_argument("--plot", type=Path, default=None, help="ratio-vs-accuracy PNG")
    b.set_defaults(func=_bench_codec)
    b = bsub.add_parser("runtime", help="torch eager vs onnxruntime per block")
    b.add_argument("--model", type=zoo_name, default="vision")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--repeats", type=int, default=50)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--json", type=Path, default=None)
    b.set_defaults(func=_bench_runtime)

    b = bsub.add_parser("agent", help="full agent pipeline vs bare onnxruntime")
    b.add_argument("--model", type=zoo_name, default="vision")
    b.add_argument("--frames", type=int, default=20_000, help="inputs per run")
    b.add_argument("--distinct", type=int, default=1000,
                   help="different inputs, replayed round and round until --frames")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--codec", default="uint8+lz4")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="uplink every input at these [uplink] batch_size values instead of "
                        "the policy variants")
    b.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="one more run per variant under py-spy; raw stacks into DIR")
    b.add_argument("--json", type=Path, default=None)
    b.set_defaults(func=_bench_agent)

    b = bsub.add_parser("distill", help="KnowledgeNet's knowledge-transfer table (digits, "
                                        "or effnet-lite0 on real photos, label-free)")
    b.add_argument("--model", choices=["digits", "effnet-lite0"], default="digits")
    b.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="default: 0-4 on digits, 0-2 on effnet-lite0")
    b.add_argument("--transfer", type=int, default=200,
                   help="digits: images the students train on (a tenth per class)")
    b.add_argument("--steps", type=int, default=None,
                   help="optimiser steps per student row (default: 600 digits, 760 effnet)")
    b.add_argument("--headroom", type=int, default=None, metavar="BLOCK",
                   help="effnet-lite0: train this one student block alone, teacher-forced, "
                        "at its own and at full width: how much agreement it can reach")
    b.add_argument("--sweep", type=int, nargs="*", default=[],
                   help="also compare logit KD and block-wise KT at these transfer sizes")
    b.add_argument("--json", type=Path, default=None)
    b.add_argument("--plot", type=Path, default=None)
    b.set_defaults(func=_bench_distill)
    _add_system_benches(bsub)


def _add_system_benches(bsub: Any) -> None:
    """``knet bench disagg|ingest|fleet|update|chain``: training on workers, the trainer, the
    fleet and the chain."""
    b = bsub.add_parser("disagg", help="blocks on worker processes: backprop, pipelined, "
                                       "synthetic gradients (digits, from labels)")
    b.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    b.add_argument("--steps", type=int, default=600, help="optimiser steps per block")
    b.add_argument("--workers", type=int, nargs="+", choices=[1, 2, 4], default=[1, 2, 4])
    b.add_argument("--json", type=Path, default=None)
    b.add_argument("--plot", type=Path, default=None, help="accuracy-vs-steps PNG")
    b.set_defaults(func=_bench_disagg)

    b = bsub.add_parser("ingest", help="trainer ingest rate from a loopback publisher")
    b.add_argument("--messages", type=int, default=20_000)
    b.add_argument("--devices", type=int, default=4)
    b.add_argument("--codec", default="uint8+lz4")
    b.add_argument("--validation", nargs="+", default=["decode", "header"])
    b.add_argument("--batch", type=int, nargs="+", default=[1],
                   help="samples per envelope (> 1: version-2 batch envelopes)")
    b.add_argument("--model", choices=["digits", "effnet-lite0"], default=None,
                   help="send this zoo student's activations (real inputs, onnxruntime) "
                        "instead of synthetic ones")
    b.add_argument("--boundary", type=int, default=2,
                   help="with --model: the boundary whose activations are sent")
    b.add_argument("--page-size", type=int, nargs="+", default=None,
                   help="the SQLite store's page size (default: the store's; several: "
                        "compared side by side)")
    b.add_argument("--store", nargs="+", choices=["sqlite", "postgresql"], default=None,
                   help="replica processes on this store (with --replicas; validation: the "
                        "first --validation)")
    b.add_argument("--replicas", nargs="+", type=int, default=None,
                   help="ingest replica processes splitting the fleet by device hash")
    b.add_argument("--json", type=Path, default=None)
    b.set_defaults(func=_bench_ingest)
    b = bsub.add_parser("fleet", help="N simulated devices against one trainer (bench/fleet.py)")
    b.add_argument("--devices", type=int, nargs="+", default=[10, 100, 500])
    b.add_argument("--duration", type=float, default=20.0, help="seconds of streaming")
    b.add_argument("--rate", type=float, default=2.0, help="envelopes per second per device")
    b.add_argument("--codec", default="uint8+lz4")
    b.add_argument("--no-update", action="store_true", help="skip the update rollout")
    b.add_argument("--per-worker", type=int, default=100,
                   help="simulated devices per worker process (paho select() needs fds < 1024)")
    b.add_argument("--json", type=Path, default=None)
    b.set_defaults(func=_bench_fleet)

    b = bsub.add_parser("update", help="signed block update to N loopback agents; swap stall")
    b.add_argument("--devices", type=int, nargs="+", default=[1, 5, 10])
    b.add_argument("--changes", nargs="+", choices=["one-block", "full-model"],
                   default=["one-block", "full-model"])
    b.add_argument("--rate-hz", type=float, default=20.0, help="each device's input rate")
    b.add_argument("--push-delay", type=float, default=0.3,
                   help="publisher's wait between manifest and chunk push")
    b.add_argument("--repeats", type=int, default=5, help="updates in the stall measurement")
    b.add_argument("--json", type=Path, default=None)
    b.set_defaults(func=_bench_update)

    b = bsub.add_parser("chain", help="DEFER chains of agents vs single process; "
                                      "planner prediction vs measurement")
    b.add_argument("--model", choices=["effnet-lite0", "vision"], default="effnet-lite0",
                   help="a five-block zoo model")
    b.add_argument("--frames", type=int, default=300)
    b.add_argument("--plan-frames", type=int, default=60)
    b.add_argument("--stages", type=int, nargs="+", choices=[1, 2, 4], default=[1, 2, 4])
    b.add_argument("--json", type=Path, default=None)
    b.set_defaults(func=_bench_chain)


def _add_bundle_commands(sub: Any) -> None:
    """``knet bundle device``: offline installs."""
    bu = sub.add_parser("bundle", help="offline install bundles for devices")
    busub = bu.add_subparsers(dest="bundle", required=True)
    b = busub.add_parser("device", help="knet-agent and every wheel for a profile's platform, "
                                        "the unit, an example config and install.sh")
    b.add_argument("--profile", required=True)
    b.add_argument("--out", type=Path, default=Path("dist"))
    b.add_argument("--arch", default=None, help="default: the profile's (aarch64, x86_64)")
    b.add_argument("--python", default=None, help="default: the profile's, e.g. 3.8")
    b.add_argument("--tar", action="store_true", help="also write a .tar.gz")
    b.set_defaults(func=_bundle)


def _add_broker_commands(sub: Any) -> None:
    """``knet broker ...``: the fleet's Mosquitto."""
    br = sub.add_parser("broker", help="a locked-down Mosquitto for a fleet")
    brsub = br.add_subparsers(dest="broker", required=True)
    b = brsub.add_parser("provision", help="create (or rotate) an account and print its "
                                           "config, or provision a list of devices")
    b.add_argument("account", nargs="?", help="device id (or trainer id with --trainer)")
    b.add_argument("--fleet", nargs="+", default=None)
    b.add_argument("--list", type=Path, dest="list_file", metavar="FILE",
                   help="CSV (header device_id,fleet,profile) or TOML ([[devices]] id, fleet, "
                        "profile): one bundle per device, idempotently (no password rotation)")
    b.add_argument("--dir", type=Path, required=True, help="the fleet's broker directory")
    b.add_argument("--trainer", action="store_true")
    b.add_argument("--cert", action="store_true", help="client certificate instead of password")
    b.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                   help="connect over TLS (with --list, default: if the directory has a CA)")
    b.add_argument("--host", default="127.0.0.1", help="what the devices dial")
    b.add_argument("--port", type=int, default=None, help="default 1883, 8883 with TLS")
    b.add_argument("--update-key", type=Path, default=None, metavar="PUB",
                   help="with --list: enable signed updates with this public key")
    b.add_argument("--profiles-dir", type=Path, action="append", default=[],
                   help="with --list: more firmware profiles the list may name")
    b.add_argument("--upstream", default=None, help="chain stage: may read this device's "
                                                   "chain topic ('' removes the link)")
    b.add_argument("--connection", action="append", default=None, metavar="NAME",
                   help="device: an extra simultaneous connection, logging in as "
                        "<device>.<NAME> (the broker binds each session to its username)")
    b = brsub.add_parser("revoke", help="remove accounts (one write of the broker's files); "
                                        "a running broker reloads")
    b.add_argument("account", nargs="*", help="device or trainer ids")
    b.add_argument("--list", type=Path, dest="list_file", metavar="FILE",
                   help="the devices of a list file (as for provision --list)")
    b.add_argument("--dir", type=Path, required=True)
    b = brsub.add_parser("provision-site", help="a site broker bridged to this (cloud) "
                                                "broker: its account here, its bridge config")
    b.add_argument("site", help="site id (the bridge's username on the cloud broker)")
    b.add_argument("--fleet", nargs="+", required=True)
    b.add_argument("--dir", type=Path, required=True, help="the cloud broker's directory")
    b.add_argument("--site-dir", type=Path, required=True, help="the site broker's directory")
    b.add_argument("--cloud-host", required=True, help="what the site broker dials")
    b.add_argument("--cloud-port", type=int, default=None, help="default 8883 (TLS)")
    b.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True)
    b.add_argument("--outage-hours", type=float, default=8.0,
                   help="cloud outage the site queue must absorb (default 8)")
    b.add_argument("--rate", type=float, default=10.0, help="site uplink messages/s")
    b.add_argument("--msg-bytes", type=int, default=2048, help="average message size")
    b = brsub.add_parser("certs", help="development CA, CRL and server certificate")
    b.add_argument("--dir", type=Path, required=True)
    b.add_argument("--name", action="append", default=None, metavar="HOST",
                   help="a host name or address devices dial (repeat; default: localhost, "
                        "127.0.0.1, ::1); a new server certificate names them all")
    b.add_argument("--renew-server", action="store_true",
                   help="re-issue the server certificate (the CA and client certs stay)")
    b = brsub.add_parser("run", help="run the fleet's Mosquitto in the foreground")
    b.add_argument("--dir", type=Path, required=True)
    b.add_argument("--port", type=int, default=1883)
    b.add_argument("--tls-port", type=int, default=None)
    b.add_argument("--mtls-port", type=int, default=None)
    b.add_argument("--bind", default="127.0.0.1")
    for parser in brsub.choices.values():
        parser.set_defaults(func=_broker)


def _add_keys_commands(sub: Any) -> None:
    """``knet keys gen``: the update-signing keys."""
    k = sub.add_parser("keys", help="update-signing keys")
    ksub = k.add_subparsers(dest="keys", required=True)
    g = ksub.add_parser("gen", help="create an Ed25519 key pair for signing block updates")
    g.add_argument("--dir", type=Path, required=True)
    g.add_argument("--name", default="knet-update")
    g.set_defaults(func=_keys_gen)


def _add_model_commands(sub: Any) -> None:
    """``knet export`` and ``knet cuts``: a model's blocks."""
    e = sub.add_parser("export", help="export a model's blocks to ONNX for a profile")
    e.add_argument("--model", type=model_ref, default="digits",
                   help="zoo name or package.module:factory")
    model_source_args(e)
    e.add_argument("--profile", default="x86-dev")
    e.add_argument("--role", choices=["student", "teacher"], default="student")
    e.add_argument("--version", type=int, default=1)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True)
    e.set_defaults(func=_export)

    c = sub.add_parser("cuts", help="every point where one tensor crosses (traced cut "
                                    "candidates): shape, bytes, params and FLOPs per side")
    c.add_argument("--model", type=model_ref, required=True,
                   help="zoo name or package.module:factory")
    c.add_argument("--role", choices=["teacher", "student"], default="teacher",
                   help="which model of a pair to trace")
    c.add_argument("--weights", type=Path, default=None)
    c.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="input shape when the factory's model cannot say")
    c.add_argument("--select", default=None, metavar="SPEC",
                   help="mark a subset: all, modules[:D], a block count N[:D], "
                        "or candidate names/indices")
    c.add_argument("--json", type=Path, default=None)
    c.add_argument("--plot", type=Path, default=None, help="PNG: bytes, cumulative FLOPs")
    c.set_defaults(func=_cuts)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        if _top(exc) not in OPTIONAL_PACKAGES:
            raise
        print(f"knet {args.command}: this installation lacks {_top(exc)}, "
              f"{OPTIONAL_PACKAGES[_top(exc)]} (e.g. the trainer image ships only the "
              f"daemon and the operator commands)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

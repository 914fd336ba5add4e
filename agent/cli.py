"""`knet-agent`: run the device agent, check its configuration, or benchmark its blocks."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.configfile import ConfigError
from agent.errors import KnetAgentError


def check(config_path: Path) -> str:
    """Validate config, profile, manifest and block files; returns a one-line summary."""
    from agent.config import check_partition, load_config
    from agent.infer.manifest import ManifestError, PartitionManifest
    from agent.infer.profiles import load_profile
    from agent.infer.runtime import BlockRunner, PartitionError

    cfg = load_config(config_path)
    profile = load_profile(cfg.model.profile, [cfg.model.profiles_dir])
    try:
        manifest = PartitionManifest.load(cfg.model.manifest)
    except ManifestError as exc:
        raise ConfigError(f"{config_path}: model.manifest: {exc}") from None
    for warning in check_partition(cfg, manifest, profile):
        print(f"warning: {warning}", file=sys.stderr)
    try:
        runner = BlockRunner(manifest, cfg.model.manifest.parent, profile)
    except PartitionError as exc:
        raise ConfigError(f"{config_path}: model.manifest: {exc}") from None
    cfg.mqtt.resolve_password()
    return (f"ok: device {cfg.device.id} (fleet {cfg.device.fleet}), profile {profile.name}, "
            f"{manifest.model_id} v{manifest.model_version} blocks {manifest.first}.."
            f"{manifest.last} on {', '.join(runner.active_providers)}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from agent.compat import check_onnxruntime_numpy

    try:  # before anything imports onnxruntime: a mismatched build crashes, it does not raise
        check_onnxruntime_numpy()
    except ImportError as exc:
        print(f"knet-agent: {exc}", file=sys.stderr)
        return 2
    if argv[:1] == ["benchmark"]:  # `knet-agent benchmark --config ...` (agent/infer/blockbench.py)
        from agent.infer.blockbench import cli_main

        return cli_main(argv[1:])
    p = argparse.ArgumentParser(prog="knet-agent", description=__doc__)
    p.add_argument("--config", type=Path, required=True, help="agent.toml")
    p.add_argument("--check", action="store_true",
                   help="validate everything and exit (non-zero with the reason); no network")
    p.add_argument("--exit-when-done", action="store_true",
                   help="exit once a finite source is fully sent and acknowledged")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.check:
            print(check(args.config))
            return 0
        from agent.config import load_config
        from agent.service import Agent

        cfg = load_config(args.config)
        if args.exit_when_done:
            cfg = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(
                update={"exit_when_done": True})})
        service = Agent(cfg, config_path=args.config)
    except ConfigError as exc:
        print(f"knet-agent: {exc}", file=sys.stderr)
        return 2
    except (KnetAgentError, OSError, ValueError) as exc:
        # a partition that cannot load, a broken profile, an unwritable state directory:
        # one line; anything else is a bug and keeps its traceback (the exit code is 1 too)
        logging.getLogger("knet-agent").error("cannot start: %s", exc)
        return 1
    service.install_signal_handlers()
    return service.run()


if __name__ == "__main__":
    sys.exit(main())

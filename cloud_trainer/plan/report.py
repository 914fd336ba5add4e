"""What ``knet plan`` hands back: a ranked table, JSON, a PNG, per-node manifests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from agent.infer.manifest import PartitionManifest
from cloud_trainer.plan.network import NetworkConfig
from cloud_trainer.plan.solver import Plan, Problem


def describe(p: Problem, plan: Plan) -> dict[str, Any]:
    """A plan as JSON: slices per node, cuts with codec and bytes, predicted figures."""
    return {
        "value": plan.value,
        "latency_s": plan.metrics["latency_s"],
        "throughput_per_s": plan.metrics["throughput"],
        "bottleneck_s": plan.metrics["bottleneck_s"],
        "energy_j": plan.metrics["energy_j"],
        "bytes_per_inference": plan.metrics["bytes"],
        "accuracy_loss": plan.metrics["loss"],
        "slices": [{"node": p.node_names[s.node], "first": s.first, "last": s.last}
                   for s in plan.slices],
        "cuts": [{"boundary": c.boundary, "from": p.node_names[c.src],
                  "to": p.node_names[c.dst], "codec": p.codec_names[c.codec],
                  "bytes": float(p.bytes_[c.boundary, c.codec])} for c in plan.cuts],
        "stages": [{"name": n, "seconds": v} for n, v in plan.stages],
    }


def placement(p: Problem, plan: Plan) -> str:
    parts = []
    for s in plan.slices:
        blocks = f"{s.first}-{s.last}" if s.last >= s.first else "input"
        parts.append(f"{p.node_names[s.node]}[{blocks}]")
    return " → ".join(parts)


def plot_plan(p: Problem, plans: list[Plan], path: Path) -> Path:
    """Per-block time on every node (lines), the chosen placement and cuts of each plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(range(1, p.n_blocks + 1))
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.25 * p.n_blocks + 4), 6.5),
                             gridspec_kw={"height_ratios": [3, max(1, len(plans)) * 0.6]})
    ax = axes[0]
    for t, name in enumerate(p.node_names):
        ax.plot(blocks, p.comp[t] * 1e3, marker="o", ms=3, label=name)
    if plans:
        for c in plans[0].cuts:
            ax.axvline(c.boundary + 0.5, color="red", ls="--", lw=1)
            ax.annotate(f"{p.codec_names[c.codec]}\n{p.bytes_[c.boundary, c.codec]:.0f} B",
                        (c.boundary + 0.5, ax.get_ylim()[1] * 0.9), fontsize=7, color="red")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel("median ms per block")
    ax.set_title("per-block time per node; red: cut points of the best plan")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2 = axes[1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for rank, plan in enumerate(plans):
        for s in plan.slices:
            if s.last >= s.first:
                ax2.barh(rank, s.last - s.first + 1, left=s.first - 0.5,
                         color=colors[s.node % len(colors)], edgecolor="black")
                ax2.text((s.first + s.last) / 2, rank, p.node_names[s.node], ha="center",
                         va="center", fontsize=7)
    ax2.set_yticks(range(len(plans)), [f"#{i + 1}" for i in range(len(plans))])
    ax2.invert_yaxis()
    ax2.set_xlim(0.5, p.n_blocks + 0.5)
    ax2.set_xlabel("block → node, ranked plans")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_manifests(p: Problem, plan: Plan, net: NetworkConfig, out: Path,
                    exports: dict[tuple[str, str], Path]) -> dict[str, Path]:
    """One deployable directory per node that runs blocks: a manifest slice + its files.

    ``exports`` maps (profile, role) to the directory of a whole-model export for it.
    """
    written = {}
    active = [s for s in plan.slices if s.last >= s.first]
    sends = {c.src: p.codec_names[c.codec] for c in plan.cuts}
    for i, s in enumerate(plan.slices):
        if s.last < s.first:
            continue  # node 0 only sends the input
        node = net.nodes[s.node]
        src = exports[(node.profile, node.role)]
        full = PartitionManifest.load(src / "manifest.json")
        part = full.slice(s.first, s.last)
        dst = out / node.name
        dst.mkdir(parents=True, exist_ok=True)
        for b in part.blocks:
            shutil.copy2(src / b.file, dst / b.file)
        part.dump(dst / "manifest.json")
        part.verify_files(dst)
        written[node.name] = dst / "manifest.json"
        prev = plan.slices[i - 1] if i > 0 else None
        (dst / "agent-chain.toml").write_text(chain_snippet(
            p, node.name, None if prev is None else p.node_names[prev.node],
            sends.get(s.node), len(active) > 1))
    return written


def chain_snippet(p: Problem, node: str, upstream: str | None, codec: str | None,
                  chained: bool) -> str:
    """The ``[source]``/``[chain]`` sections of this node's agent.toml (agent/infer/chain.py);
    node names are the devices' ids."""
    lines = [f"# {node}: merge into its agent.toml (model.manifest = this directory's "
             "manifest.json)"]
    if upstream is not None:
        lines += ["[source]", 'kind = "upstream"', f'device = "{upstream}"']
    if chained:
        lines += ["[chain]", "enabled = true"]
        if codec is not None:
            lines.append(f'codec = "{codec}"')
    return "\n".join(lines) + "\n"


def write_json(path: Path, p: Problem, plans: list[Plan], objective: str,
               extra: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"objective": objective, "nodes": p.node_names, "codecs": p.codec_names,
            "plans": [describe(p, pl) for pl in plans], **extra}
    path.write_text(json.dumps(body, indent=2, default=str) + "\n")
    return path

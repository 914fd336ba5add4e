"""Automatic cut points (Scission-style) for any torch model whose graph torch.fx traces.

A *cut* splits the traced graph, in its topological order, into a part before and a part
after. It is a valid block boundary only where exactly one value produced before is still
needed after, and that value is a tensor: then the part after needs nothing but that
tensor, which is what a device sends. Parameters and buffers (``get_attr``) do not cross,
they live in the modules. Inside a residual block the block's input is still needed by the
final ``+``, so no cut falls there; its output (the sum) is a candidate.

``find_cuts`` lists every candidate with its boundary shape, fp32 bytes, and parameters
and FLOPs on each side; ``block_model_from_cuts`` builds a :class:`BlockModel` whose blocks
are ``fx.GraphModule`` pieces of the traced graph (sharing the model's parameters).

The graph is traced in eval mode, so functional calls that read ``self.training`` (e.g.
``F.dropout(x, training=self.training)``) keep their inference behaviour in the blocks.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.models.blocks import BlockModel, Shape

log = logging.getLogger(__name__)


class CutError(KnetTrainerError, ValueError):
    """A model that cannot be traced or cut, or a cut selection that does not fit."""


@dataclass(frozen=True)
class CutPoint:
    """One valid cut: after graph node ``node`` (whose output is the only crossing tensor).

    ``index`` numbers candidates from 1 in graph order; ``module`` is the module the node
    runs in (``""`` at the top level); shapes exclude the batch dimension; params and FLOPs
    are per input (batch 1), split between the part before and the part after.
    """

    index: int
    node: str
    op: str
    module: str
    shape: Shape
    bytes_fp32: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CutAnalysis:
    """A traced model: its graph, every node's FLOPs, and the cut candidates."""

    graph_module: fx.GraphModule
    input_shape: Shape
    output_shape: Shape
    cuts: list[CutPoint]
    total_params: int
    total_flops: int
    positions: dict[str, int]  # candidate node name -> index in the graph's node list


# ops that move no arithmetic: reshapes, views, indexing, dropout in eval mode
_FREE = {"flatten", "view", "reshape", "permute", "transpose", "contiguous", "squeeze",
         "unsqueeze", "getitem", "getattr", "size", "dropout", "identity", "expand",
         "chunk", "split", "t", "to", "type_as", "detach", "clone"}


def _name(target: Any) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target)).lstrip("_")


def _shape(node: fx.Node) -> Shape | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(d) for d in meta.shape)


def _numel(shape: Shape | None) -> int:
    return 0 if shape is None else math.prod(shape[1:]) if shape else 1


def node_flops(node: fx.Node, modules: dict[str, nn.Module]) -> int:
    """FLOPs per input of one node, from its traced shapes.

    Counted: convolutions, linear layers and matrix products as 2 × multiply-accumulates
    (+ one per output for a bias); every other tensor op as one FLOP per output element
    (batch norm, activations, adds, pooling); reshapes, indexing and dropout as zero.
    """
    out = _shape(node)
    if out is None or node.op in ("placeholder", "get_attr", "output"):
        return 0
    n_out = _numel(out)
    if node.op == "call_module":
        return _module_flops(modules[str(node.target)], n_out)
    return _function_flops(node, n_out)


def _module_flops(mod: nn.Module, n_out: int) -> int:
    """``node_flops`` of a ``call_module`` node with ``n_out`` output elements."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        k = math.prod(mod.kernel_size) * mod.in_channels // mod.groups
        return 2 * n_out * k + (n_out if mod.bias is not None else 0)
    if isinstance(mod, nn.Linear):
        return 2 * n_out * mod.in_features + (n_out if mod.bias is not None else 0)
    if isinstance(mod, nn.Dropout | nn.Identity | nn.Flatten | nn.Unflatten):
        return 0
    return n_out


def _function_flops(node: fx.Node, n_out: int) -> int:
    """``node_flops`` of a function or method call with ``n_out`` output elements."""
    name = _name(node.target)
    if name.startswith("conv") and len(node.args) >= 2 and isinstance(node.args[1], fx.Node):
        w = _shape(node.args[1])
        if w is not None:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            return 2 * n_out * math.prod(w[1:]) + (n_out if bias is not None else 0)
    if name == "linear" and len(node.args) >= 2 and isinstance(node.args[1], fx.Node):
        w = _shape(node.args[1])
        if w is not None:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            return 2 * n_out * w[-1] + (n_out if bias is not None else 0)
    if name in ("matmul", "mm", "bmm") and isinstance(node.args[0], fx.Node):
        a = _shape(node.args[0])
        if a is not None:
            return 2 * n_out * a[-1]
    if name in _FREE:
        return 0
    return n_out


def _node_params(node: fx.Node, gm: fx.GraphModule, modules: dict[str, nn.Module]
                 ) -> list[nn.Parameter]:
    if node.op == "call_module":
        return list(modules[str(node.target)].parameters())
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return [obj] if isinstance(obj, nn.Parameter) else []
    return []


def trace(model: nn.Module, input_shape: Sequence[int]) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` in eval mode, with shapes propagated at batch 1."""
    was_training = model.training
    model.eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError...
        raise CutError(f"torch.fx cannot trace {type(model).__name__}: {exc} (data-dependent "
                       "control flow? cut it by hand with BlockModel instead)") from None
    finally:
        model.train(was_training)
    gm.eval()
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise CutError(f"{type(model).__name__} takes {len(inputs)} inputs; cuts need one")
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    except Exception as exc:  # fx's shape propagation raises whatever the model raises
        raise CutError(f"{type(model).__name__} does not accept input shape "
                       f"{tuple(input_shape)}: {exc}") from None
    return gm


def analyse(model: nn.Module, input_shape: Sequence[int]) -> CutAnalysis:
    """Trace ``model`` and list every valid cut (see the module doc)."""
    shape_in: Shape = tuple(int(d) for d in input_shape)
    gm = trace(model, shape_in)
    nodes = list(gm.graph.nodes)
    modules = dict(gm.named_modules())
    out_node = nodes[-1]
    result = out_node.args[0]
    if not isinstance(result, fx.Node) or _shape(result) is None:
        raise CutError(f"{type(model).__name__} must return one tensor")
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users), default=-1) for n in nodes}
    flops = [node_flops(n, modules) for n in nodes]
    # each parameter counts once, at the first node that uses it
    first_use: dict[int, tuple[int, int]] = {}
    for i, n in enumerate(nodes):
        at = min((pos[u] for u in n.users), default=i) if n.op == "get_attr" else i
        for p in _node_params(n, gm, modules):
            if id(p) not in first_use or at < first_use[id(p)][0]:
                first_use[id(p)] = (at, p.numel())
    params = [0] * len(nodes)
    for at, count in first_use.values():
        params[at] += count
    total_params, total_flops = sum(params), sum(flops)
    cum_p, cum_f = 0, 0
    live: set[fx.Node] = set()
    cuts: list[CutPoint] = []
    positions: dict[str, int] = {}
    seen: set[fx.Node] = set()
    for i, n in enumerate(nodes[:-1]):
        cum_p += params[i]
        cum_f += flops[i]
        if n.op != "get_attr" and last_use[n] > i:
            live.add(n)
        live = {v for v in live if last_use[v] > i}
        if len(live) != 1 or n.op in ("placeholder", "get_attr"):
            continue
        (v,) = live
        shape = _shape(v)
        if v.op == "placeholder" or v is result or v in seen or shape is None \
                or len(shape) < 2 or shape[0] != 1 or v.meta["tensor_meta"].dtype \
                != torch.float32:
            continue
        seen.add(v)
        stack = _modules_at(v, 1_000)
        op = type(modules[str(v.target)]).__name__ if v.op == "call_module" else _name(v.target)
        cuts.append(CutPoint(op=op,
            index=len(cuts) + 1, node=v.name, module=stack[-1] if stack
            else "", shape=shape[1:], bytes_fp32=4 * _numel(shape), params_before=cum_p,
            params_after=total_params - cum_p, flops_before=cum_f,
            flops_after=total_flops - cum_f))
        positions[v.name] = i
    log.debug("%s: %d nodes, %d cut candidates", type(model).__name__, len(nodes), len(cuts))
    return CutAnalysis(gm, shape_in, tuple(_shape(result)[1:]), cuts, total_params,  # type: ignore[index]
                       total_flops, positions)


def find_cuts(model: nn.Module, input_shape: Sequence[int]) -> list[CutPoint]:
    """Every point of ``model``'s traced graph where exactly one tensor crosses."""
    return analyse(model, input_shape).cuts


def _modules_at(node: fx.Node, depth: int) -> tuple[str, ...]:
    """The modules ``node`` runs in, outermost first, down to ``depth`` levels."""
    return tuple(re.sub(r"@\d+$", "", k) for k in node.meta.get("nn_module_stack", {}))[:depth]


def module_boundaries(analysis: CutAnalysis, depth: int = 1) -> list[CutPoint]:
    """Candidates where the modules (down to ``depth`` levels) differ on the two sides."""
    nodes = list(analysis.graph_module.graph.nodes)
    chosen = []
    for c in analysis.cuts:
        i = analysis.positions[c.node]
        nxt = next((n for n in nodes[i + 1:] if n.op not in ("get_attr", "output")), None)
        if nxt is None or _modules_at(nodes[i], depth) != _modules_at(nxt, depth):
            chosen.append(c)
    return chosen


def select_cuts(analysis: CutAnalysis, spec: str | Sequence[str]) -> list[CutPoint]:
    """A subset of the candidates, by a spec:

    - ``"all"``: every candidate;
    - ``"modules"``: candidates between two different top-level modules (for a model built
      of stages, the stage boundaries; for an ``nn.Sequential``, every layer boundary);
      ``"modules:D"`` compares the modules down to D levels (finer: e.g. every MBConv of a
      ``BlockModel`` whose blocks are ``nn.Sequential`` stages);
    - ``"N"`` (an integer ≥ 1): N blocks, cut among the ``"modules"`` candidates where the
      FLOPs before are nearest to 1/N, 2/N, ... of the total (balanced compute); ``"N:D"``
      among the ``"modules:D"`` ones;
    - candidate node names or 1-based candidate indices, comma-separated or as a list.
    """
    cuts = analysis.cuts
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)
             if s.strip()]
    if names == ["all"]:
        return list(cuts)
    coarse = re.fullmatch(r"(modules|\d+)(?::(\d+))?", names[0]) if len(names) == 1 else None
    if coarse:  # "3" alone is a block count; "3,7" are candidate indices
        depth = int(coarse.group(2) or 1)
        if depth < 1:
            raise CutError(f"{names[0]!r}: the module depth must be at least 1")
        chosen = module_boundaries(analysis, depth)
        if coarse.group(1) == "modules":
            return chosen
        return _balanced(chosen, int(coarse.group(1)), analysis.total_flops)
    by_name = {c.node: c for c in cuts}
    picked = []
    for s in names:
        if s.isdigit() and 1 <= int(s) <= len(cuts):
            picked.append(cuts[int(s) - 1])
        elif s in by_name:
            picked.append(by_name[s])
        else:
            raise CutError(f"{s!r} is not a cut candidate (see `knet cuts`: node names or "
                           f"indices 1..{len(cuts)}, or all, modules, or a block count)")
    return sorted(set(picked), key=lambda c: c.index)


def _balanced(cands: list[CutPoint], blocks: int, total: int) -> list[CutPoint]:
    if blocks < 1:
        raise CutError("a block count must be at least 1")
    if blocks - 1 > len(cands):
        raise CutError(f"{blocks} blocks need {blocks - 1} cuts; only {len(cands)} module "
                       "boundaries (use 'all' candidates by name for finer cuts)")
    chosen: list[CutPoint] = []
    for k in range(1, blocks):
        target = total * k / blocks
        rest = [c for c in cands if not chosen or c.index > chosen[-1].index]
        need_after = blocks - 1 - k  # leave room for the remaining cuts
        rest = rest[:len(rest) - need_after] if need_after else rest
        chosen.append(min(rest, key=lambda c: abs(c.flops_before - target)))
    return chosen


def block_model_from_cuts(model: nn.Module, cuts: Iterable[CutPoint | str],
                          input_shape: Sequence[int],
                          analysis: CutAnalysis | None = None) -> BlockModel:
    """Cut ``model`` into a :class:`BlockModel` at the given candidates (points or names).

    Each block is an ``fx.GraphModule`` holding the nodes between two cuts; parameters and
    submodules are shared with ``model`` (not copied). No cuts: one block, the whole graph.
    """
    analysis = analysis or analyse(model, input_shape)
    names = [c.node if isinstance(c, CutPoint) else str(c) for c in cuts]
    unknown = [n for n in names if n not in analysis.positions]
    if unknown:
        raise CutError(f"not cut candidates of {type(model).__name__}: {unknown}")
    gm = analysis.graph_module
    nodes = list(gm.graph.nodes)
    ends = sorted({analysis.positions[n] for n in names})
    by_pos = {analysis.positions[c.node]: c.node for c in analysis.cuts}
    bounds = [-1, *ends, len(nodes) - 2]
    entry = nodes[0]
    blocks = []
    for a, b in itertools.pairwise(bounds):
        carried = entry if a < 0 else next(n for n in nodes if n.name == by_pos[a])
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {carried: g.placeholder("x")}

        def arg(n: fx.Node, g: fx.Graph = g, env: dict[fx.Node, fx.Node] = env) -> fx.Node:
            if n not in env:
                if n.op != "get_attr":
                    raise CutError(f"node {n.name} crosses the cut: not a valid candidate")
                env[n] = g.node_copy(n, lambda m: env[m])
            return env[n]

        for n in nodes[a + 1:b + 1]:
            if n.op in ("placeholder", "get_attr", "output"):
                continue
            env[n] = g.node_copy(n, arg)
        last = nodes[-1].args[0] if b == len(nodes) - 2 else \
            next(n for n in nodes if n.name == by_pos[b])
        g.output(arg(last))  # type: ignore[arg-type]
        g.lint()
        blocks.append(fx.GraphModule(gm, g, class_name=f"Block{len(blocks) + 1}"))
    return BlockModel(blocks, analysis.input_shape).eval()


def plot_cuts(analysis: CutAnalysis, path: str | Any, marked: Sequence[CutPoint] = ()) -> None:
    """PNG: boundary bytes at every candidate, cumulative FLOPs and params along the model,
    the ``marked`` cuts (a chosen subset) as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuts = analysis.cuts
    x = [c.index for c in cuts]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, len(cuts) * 0.12), 7), sharex=True)
    ax1.bar(x, [c.bytes_fp32 / 1024 for c in cuts], color="tab:blue")
    ax1.set_ylabel("boundary KiB (fp32, per input)")
    ax1.set_yscale("log")
    ax1.set_title(f"cut candidates: {len(cuts)} (input {analysis.input_shape})")
    tf, tp = max(analysis.total_flops, 1), max(analysis.total_params, 1)
    ax2.plot(x, [100 * c.flops_before / tf for c in cuts], "o-", ms=3, label="FLOPs before")
    ax2.plot(x, [100 * c.params_before / tp for c in cuts], "s-", ms=3, label="params before")
    ax2.set_ylabel("% of the model before the cut")
    ax2.set_xlabel("cut candidate (graph order)")
    ax2.legend(loc="upper left")
    for c in marked:
        for ax in (ax1, ax2):
            ax.axvline(c.index, color="tab:red", lw=0.8, alpha=0.7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["CutAnalysis", "CutError", "CutPoint", "analyse", "block_model_from_cuts",
           "find_cuts", "module_boundaries", "node_flops", "plot_cuts",
           "select_cuts", "trace"]

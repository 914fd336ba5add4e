"""Automatic cut points (cloud_trainer/models/cuts.py) and bring-your-own models (zoo/refs.py)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from cloud_trainer.models.cuts import (
    CutError,
    analyse,
    block_model_from_cuts,
    find_cuts,
    select_cuts,
)
from cloud_trainer.models.zoo.efficientnet_lite import EfficientNetLite

SIZE = 64


@pytest.fixture(scope="module")
def effnet() -> tuple[EfficientNetLite, object]:
    torch.manual_seed(0)
    model = EfficientNetLite(SIZE).eval()
    return model, analyse(model, (3, SIZE, SIZE))


def test_no_cut_inside_a_residual_block(effnet) -> None:
    model, analysis = effnet
    skips = [k for k, b in enumerate(model._blocks) if b.skip]
    plain = [k for k, b in enumerate(model._blocks) if not b.skip]
    assert len(skips) == 9 and len(plain) == 7
    for k in skips:
        inside = [c for c in analysis.cuts if c.module.startswith(f"_blocks.{k}")]
        # the sum h + x is the block's output, the only candidate it has
        assert [(c.op, c.module) for c in inside] == [("add", f"_blocks.{k}")], inside
    for k in plain:  # no skip: every layer boundary inside is a cut
        assert len([c for c in analysis.cuts if c.module.startswith(f"_blocks.{k}.")]) >= 5


def test_stage_boundaries_and_figures(effnet) -> None:
    model, analysis = effnet
    with torch.no_grad():
        h = model.act(model._bn0(model._conv_stem(torch.zeros(1, 3, SIZE, SIZE))))
        outs = []
        for b in model._blocks:
            h = b(h)
            outs.append(tuple(h.shape[1:]))
    modules = select_cuts(analysis, "modules")
    # one cut at the end of every MBConv block (16), in order, with its output shape
    ends = [c for c in modules if c.module.startswith("_blocks.")]
    assert [c.shape for c in ends] == outs
    total = sum(p.numel() for p in model.parameters())
    assert analysis.total_params == total
    for c in analysis.cuts:
        assert c.params_before + c.params_after == total
        assert c.flops_before + c.flops_after == analysis.total_flops
        assert c.bytes_fp32 == 4 * int(torch.tensor(c.shape).prod())
    before = [c.flops_before for c in analysis.cuts]
    assert before == sorted(before) and analysis.cuts[-1].shape == (1280,)


def test_block_chain_equals_the_whole_model(effnet) -> None:
    model, analysis = effnet
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        for spec in ("4", "modules", "add_2,_blocks_8__bn2,12"):
            chosen = select_cuts(analysis, spec)
            blocks = block_model_from_cuts(model, chosen, (3, SIZE, SIZE), analysis)
            assert blocks.num_blocks == len(chosen) + 1
            assert blocks.boundary_shapes[1:-1] == tuple(c.shape for c in chosen)
            assert torch.allclose(blocks(x), ref, atol=1e-5)
            assert blocks.params() == sum(p.numel() for p in model.parameters())
    four = select_cuts(analysis, "4")
    share = [c.flops_before / analysis.total_flops for c in four]
    assert all(abs(s - k / 4) < 0.15 for s, k in zip(share, (1, 2, 3), strict=True)), share


def test_zoo_effnet_teacher_cut_points() -> None:
    """The zoo's effnet-lite0 teacher (pretrained, cut by hand at stage boundaries): its
    traced top-level boundaries are its blocks; ``modules:2`` finds every MBConv output."""
    from cloud_trainer.models.zoo import effnet

    t = effnet.teacher()
    a = analyse(t, t.input_shape)
    assert tuple(c.shape for c in select_cuts(a, "modules")) == t.boundary_shapes[1:-1]
    fine = select_cuts(a, "modules:2")
    assert len([c for c in fine if c.op == "add"]) == 9  # the 9 residual MBConvs
    x = torch.rand(2, *t.input_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        chain = block_model_from_cuts(t, fine, t.input_shape, a)
        assert chain.num_blocks == len(fine) + 1
        assert torch.allclose(chain(x), t(x), atol=1e-4)
    assert len(select_cuts(a, "8:2")) == 7


def test_flops_params_and_bytes_by_hand() -> None:
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 5))
    cuts = find_cuts(seq, (3, 4, 4))
    assert [c.node for c in cuts] == ["_0", "_1", "_2"]
    conv = 2 * (8 * 16) * 27 + 8 * 16  # 2 × MACs + bias
    relu = 8 * 16
    assert (cuts[0].flops_before, cuts[1].flops_before) == (conv, conv + relu)
    assert cuts[2].flops_before == conv + relu  # flatten is free
    assert cuts[2].flops_after == 2 * 128 * 5 + 5
    assert (cuts[0].params_before, cuts[0].params_after) == (224, 645)
    assert cuts[0].bytes_fp32 == 8 * 16 * 4 and cuts[2].shape == (128,)


class Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        z = torch.relu(self.b(y))  # y is still needed below: no cut after b or relu
        return self.c(z * y)


class Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


def test_skip_connection_and_untraceable() -> None:
    cuts = find_cuts(Skip(), (4, 3, 3))
    assert [c.node for c in cuts] == ["a", "mul"]
    with pytest.raises(CutError, match=r"torch\.fx cannot trace Branchy"):
        analyse(Branchy(), (4,))
    with pytest.raises(CutError, match="not a cut candidate"):
        select_cuts(analyse(Skip(), (4, 3, 3)), "relu")


# --- bring your own model ------------------------------------------------------------------
FACTORIES = '''
import torch
from torch import nn
from cloud_trainer.models.blocks import BlockModel, ModelPair

def _blocks(width):
    return BlockModel([nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(width, 8, 1)),
                       nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 4))], (3, 6, 6))

def pair():
    return _blocks(16), _blocks(4)

def model_pair():
    return ModelPair("mine", _blocks(16), _blocks(4))

def teacher_blocks():
    return _blocks(16)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 4))

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.body(h) + h)

def plain():
    return Net()

def plain_with_shape():
    net = Net()
    net.input_shape = (3, 6, 6)
    return net

def wrong_type():
    return {"teacher": 1}

def mismatched():
    small = BlockModel([nn.Sequential(nn.Conv2d(3, 5, 1)),
                        nn.Sequential(nn.Flatten(), nn.Linear(5 * 6 * 6, 4))], (3, 6, 6))
    return _blocks(16), small

def broken():
    raise RuntimeError("no GPU here")
'''


@pytest.fixture
def byo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "byo_models.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_factory_results(byo: Path) -> None:
    from cloud_trainer.models.zoo.refs import load_ref, resolve_pair

    pair = resolve_pair("byo_models:pair")
    assert pair.model_id == "pair" and pair.num_blocks == 2
    assert pair.teacher.params() > pair.student.params()
    assert resolve_pair("byo_models:model_pair").model_id == "mine"
    assert load_ref("byo_models:model_pair").model_id == "mine"
    alone = resolve_pair("byo_models:teacher_blocks")
    assert alone.teacher is not alone.student  # a copy: deployed as its own student
    assert alone.student.params() == alone.teacher.params()
    cut = resolve_pair("byo_models:plain", input_shape="3,6,6", cuts="modules")
    # stem's output waits for the add: no cut between body's layers, one after the add
    assert cut.boundary_shapes == ((3, 6, 6), (8, 6, 6), (8, 6, 6), (4,))
    loaded = load_ref("byo_models:plain_with_shape")
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(loaded.as_pair("all").teacher(x), loaded.whole(x), atol=1e-6)


@pytest.mark.parametrize(("ref", "kwargs", "message"), [
    ("byo_models:wrong_type", {}, "returned dict; expected a ModelPair"),
    ("byo_models:mismatched", {}, "teacher and student do not match"),
    ("byo_models:plain", {}, "cannot tell the input shape"),
    ("byo_models:plain_with_shape", {"input_shape": "3,8,8"}, "input shape (3, 8, 8) given"),
    ("byo_models:broken", {}, "factory raised RuntimeError: no GPU here"),
    ("byo_models:nothing", {}, "has no attribute 'nothing'"),
    ("no_such_pkg.models:f", {}, "cannot import no_such_pkg.models"),
    ("resnet", {}, "neither a zoo model"),
    ("byo_models:pair", {"weights": "missing.pt"}, "weights missing.pt: no such file"),
])
def test_factory_errors_say_what(byo: Path, ref: str, kwargs: dict, message: str) -> None:
    from cloud_trainer.models.zoo.refs import ModelRefError, resolve_pair

    with pytest.raises(ModelRefError) as err:
        resolve_pair(ref, **kwargs)
    assert message in str(err.value)


def test_weights_are_loaded_and_checked(byo: Path) -> None:
    from cloud_trainer.models.zoo.refs import ModelRefError, resolve_pair

    trained = resolve_pair("byo_models:pair", seed=7)
    torch.save({"teacher": trained.teacher.state_dict(),
                "student": trained.student.state_dict()}, byo / "w.pt")
    again = resolve_pair("byo_models:pair", seed=8, weights=byo / "w.pt")
    for a, b in zip(trained.student.parameters(), again.student.parameters(), strict=True):
        assert torch.equal(a, b)
    torch.save(trained.teacher.state_dict(), byo / "flat.pt")
    with pytest.raises(ModelRefError, match="'teacher' and/or 'student'"):
        resolve_pair("byo_models:pair", weights=byo / "flat.pt")
    with pytest.raises(ModelRefError, match="teacher does not fit the model"):
        resolve_pair("byo_models:plain_with_shape", weights=byo / "flat.pt")
    (byo / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelRefError, match="cannot read it as a torch state dict"):
        resolve_pair("byo_models:teacher_blocks", weights=byo / "junk.pt")


TRAINER = """
[trainer]
signing_key_file = "k.key"
state_dir = "state"
[models.mine]
"""


@pytest.mark.parametrize(("body", "message"), [
    ('factory = "byo_models:wrong_type"', "models.mine: factory: byo_models:wrong_type"),
    ('factory = "byo_models:mismatched"', "teacher and student do not match"),
    ('factory = "byo_models:nope"', "models.mine: factory: byo_models:nope: module"),
    ('factory = "byo_models pair"', "models.mine.factory"),
    ('factory = "byo_models:plain"', "cannot tell the input shape"),
    ('factory = "byo_models:pair"\nweights = "w.pt"', "models.mine: weights: weights "),
    ('factory = "byo_models:pair"\nzoo = "digits"', "give zoo or factory, not both"),
    ('zoo = "digits"\nweights = "w.pt"', "weights: only for a factory model"),
    ('zoo = "digits"\ncuts = "4"', "cuts: only for a factory model"),
    ('factory = "byo_models:plain"\ninput_shape = [3, 6, 6]\ncuts = "zz"',
     "models.mine: cuts: 'zz' is not a cut candidate"),
])
def test_trainer_toml_names_file_and_field(byo: Path, body: str, message: str) -> None:
    from agent.configfile import ConfigError
    from cloud_trainer.trainer_config import load_trainer_config

    path = byo / "trainer.toml"
    path.write_text(TRAINER + body + "\n")
    with pytest.raises(ConfigError) as err:
        load_trainer_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_trainer_runtime_from_a_factory(byo: Path) -> None:
    from cloud_trainer.trainer_config import load_trainer_config
    from cloud_trainer.training.retrain import ModelRuntime

    pair = __import__("cloud_trainer.models.zoo.refs", fromlist=["x"]).resolve_pair(
        "byo_models:pair", seed=3)
    torch.save({"teacher": pair.teacher.state_dict(), "student": pair.student.state_dict()},
               byo / "w.pt")
    path = byo / "trainer.toml"
    path.write_text(TRAINER + 'factory = "byo_models:pair"\nweights = "w.pt"\n')
    cfg = load_trainer_config(path)
    section = cfg.models["mine"]
    assert section.weights == byo / "w.pt" and section.ref == "byo_models:pair"
    rt = ModelRuntime.load("mine", section)
    assert rt.num_blocks == 2
    for a, b in zip(rt.initial_student.parameters(), pair.student.parameters(), strict=True):
        assert torch.equal(a, b)  # the factory's weights are version 1, no training


def test_knet_cuts_cli_writes_table_json_and_plot(byo: Path, capsys) -> None:
    from knet_cli.main import main

    out_json, out_png = byo / "cuts.json", byo / "cuts.png"
    rc = main(["cuts", "--model", "byo_models:plain", "--input-shape", "3,6,6",
               "--select", "modules", "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    body = json.loads(out_json.read_text())
    assert body["input_shape"] == [3, 6, 6] and body["output_shape"] == [4]
    nodes = [c["node"] for c in body["cuts"]]
    assert nodes == ["stem", "add", "head_0"]  # nothing between stem and the add
    assert body["selected"] == ["stem", "add"]
    assert body["cuts"][0]["shape"] == [8, 6, 6] and body["cuts"][0]["bytes_fp32"] == 1152
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "3 cut candidates" in printed and "head_0" in printed
    assert main(["cuts", "--model", "byo_models:plain"]) == 2
    assert "cannot tell the input shape" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cuts", "--model", "not a path"])


PLAN_NETWORK = """
mqtt_overhead_bytes = 200
[[nodes]]
name = "cam"
profile = "rpi4"
bench = "rec.json"
time_scale = 8.0
[[nodes]]
name = "cloud"
profile = "x86-dev"
bench = "rec.json"
[[links]]
from = "cam"
to = "cloud"
bandwidth_mbps = 5
rtt_ms = 20
"""


def test_plan_bench_and_plan_on_traced_cuts_of_a_residual_model(byo: Path, capsys) -> None:
    """EfficientNet-Lite at 32 px, cut into 3 blocks at traced candidates, measured here and
    ranked: the planner's blocks are the traced cuts, not a Sequential's layers."""
    from agent.infer.blockbench import BenchRecord
    from cloud_trainer.models.cuts import analyse, select_cuts
    from knet_cli.main import main

    (byo / "lite.py").write_text(
        "from cloud_trainer.models.zoo.efficientnet_lite import EfficientNetLite\n"
        "def lite32():\n    m = EfficientNetLite(32)\n    m.input_shape = (3, 32, 32)\n"
        "    return m\n")
    rec_path = byo / "rec.json"
    rc = main(["plan", "bench", "--model", "lite:lite32", "--cuts", "3", "--profile",
               "x86-dev", "--role", "teacher", "--out", str(rec_path), "--samples", "4",
               "--repeats", "3", "--device", "dev-1"])
    assert rc == 0
    rec = BenchRecord.load(rec_path)
    from lite import lite32

    model = lite32()
    chosen = select_cuts(analyse(model, (3, 32, 32)), "3")
    assert rec.model_id == "lite32" and rec.num_blocks == 3 and rec.inputs == "generated"
    assert tuple(map(tuple, rec.boundaries)) == ((3, 32, 32), *(c.shape for c in chosen),
                                                 (1000,))
    assert all(b.median_s > 0 for b in rec.blocks)
    (byo / "network.toml").write_text(PLAN_NETWORK)
    out = byo / "plan.json"
    rc = main(["plan", "--model", "lite:lite32", "--network", str(byo / "network.toml"),
               "--objective", "latency", "--top", "3", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    plans = json.loads(out.read_text())["plans"]
    assert 1 <= len(plans) <= 3
    values = [p["value"] for p in plans]
    assert values == sorted(values)
    for p in plans:  # every plan runs each of the 3 traced blocks exactly once
        ran = [b for s in p["slices"] for b in range(s["first"], s["last"] + 1)]
        assert ran == [1, 2, 3], p["slices"]


def test_knet_export_a_factory_model_and_refusals(byo: Path, capsys) -> None:
    from agent.infer.manifest import PartitionManifest
    from knet_cli.main import build_parser, main

    out = byo / "export"
    assert main(["export", "--model", "byo_models:plain_with_shape", "--cuts", "modules",
                 "--out", str(out)]) == 0
    m = PartitionManifest.load(out / "manifest.json")
    assert m.model_id == "plain_with_shape" and m.num_blocks == 3
    assert tuple(map(tuple, m.boundaries)) == ((3, 6, 6), (8, 6, 6), (8, 6, 6), (4,))
    assert all((out / b.file).is_file() for b in m.blocks)
    assert main(["export", "--model", "byo_models:wrong_type", "--out", str(byo / "x")]) == 2
    assert "--model: byo_models:wrong_type: the factory returned dict" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the demo's cameras need a zoo model's bundled data
        build_parser().parse_args(["demo", "--model", "byo_models:pair"])
    assert "needs the zoo model's bundled data" in capsys.readouterr().err

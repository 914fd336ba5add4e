"""BlockRunner: sessions per block, provider fallback, boundaries, input checks, immutability."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.infer.manifest import BlockEntry, PartitionManifest, sha256_file
from agent.infer.profiles import FirmwareProfile, load_profile
from agent.infer.runtime import BlockRunner, InputError, PartitionError, check_fit, choose_providers

RNG = np.random.default_rng(0)
# (1, 4, 4) --flatten, dense 16->8, relu--> (8,) --dense 8->3--> (3,)
BOUNDARIES: tuple[tuple[int, ...], ...] = ((1, 4, 4), (8,), (3,))


def _dense_block(in_shape: tuple[int, ...], w: np.ndarray, relu: bool) -> onnx.GraphProto:
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1)]
    nodes.append(helper.make_node("MatMul", ["flat", "w"], ["mm" if relu else "output"]))
    if relu:
        nodes.append(helper.make_node("Relu", ["mm"], ["output"]))
    return helper.make_graph(
        nodes, "block",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *in_shape])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", w.shape[1]])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), "w")])


def build_partition(root: Path, *, ir_version: int = 8, opset: int = 17, first: int = 1,
                    last: int = 2, model_id: str = "tiny") -> tuple[PartitionManifest,
                                                                   list[np.ndarray]]:
    """A two-block model written with onnx.helper; returns the manifest and the weights."""
    root.mkdir(parents=True, exist_ok=True)
    weights = [RNG.standard_normal((16, 8)), RNG.standard_normal((8, 3))]
    entries = []
    for i in range(first, last + 1):
        graph = _dense_block(BOUNDARIES[i - 1], weights[i - 1], relu=i == 1)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  ir_version=ir_version)
        path = root / f"block{i}.onnx"
        onnx.save(model, path)
        entries.append(BlockEntry(index=i, file=path.name, sha256=sha256_file(path),
                                  size=path.stat().st_size, input_shape=BOUNDARIES[i - 1],
                                  output_shape=BOUNDARIES[i]))
    manifest = PartitionManifest(model_id=model_id, model_version=1, opset=opset,
                                 ir_version=ir_version, num_blocks=2, num_classes=3,
                                 boundaries=BOUNDARIES, blocks=tuple(entries))
    manifest.dump(root / "manifest.json")
    return manifest, weights


def reference(x: np.ndarray, weights: list[np.ndarray]) -> list[np.ndarray]:
    a1 = np.maximum(x.reshape(len(x), -1) @ weights[0], 0)
    return [a1, a1 @ weights[1]]


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[PartitionManifest, Path, list[np.ndarray]]:
    manifest, weights = build_partition(tmp_path / "model")
    return manifest, tmp_path / "model", weights


def test_run_returns_every_boundary_and_matches_numpy(tiny) -> None:  # type: ignore[no-untyped-def]
    manifest, base, weights = tiny
    runner = BlockRunner(manifest, base, load_profile("x86-dev"))
    assert runner.warmup() > 0
    x = RNG.standard_normal((5, 1, 4, 4)).astype(np.float32)
    outs = runner.run(x)
    assert [o.shape for o in outs] == [(5, 8), (5, 3)]
    for got, want in zip(outs, reference(x, weights), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert [o.shape for o in runner.run(x, upto=1)] == [(5, 8)]
    np.testing.assert_allclose(runner.run_block(2, outs[0]), outs[1], rtol=1e-5)
    assert runner.input_shape == (1, 4, 4) and runner.output_shape == (3,)
    assert runner.providers == ("CPUExecutionProvider",) and runner.blocks == (1, 2)
    timings: list[float] = []
    runner.run(x, timings=timings)
    assert len(timings) == 2 and all(t > 0 for t in timings)
    with pytest.raises(ValueError, match=r"upto"):
        runner.run(x, upto=3)
    with pytest.raises(ValueError, match=r"not in this partition"):
        runner.run_block(3, outs[1])


def test_bound_chain_matches_run_and_reuses_its_buffers(tiny) -> None:  # type: ignore[no-untyped-def]
    manifest, base, weights = tiny
    runner = BlockRunner(manifest, base, load_profile("x86-dev"))
    chain = runner.bound(fuse=False)  # block by block: each reads the previous buffer
    assert chain is not None and not chain.fused
    x = RNG.standard_normal((3, 1, 4, 4)).astype(np.float32)
    first = chain.run(x[:1])
    kept = [a.copy() for a in first]
    for got, want in zip(kept, reference(x[:1], weights), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    readonly = np.frombuffer(x[1:2].tobytes(), np.float32).reshape(1, 1, 4, 4)  # as sources
    timings: list[float] = []
    second = chain.run(readonly, timings)
    assert second is first and len(timings) == 2  # the same buffers, overwritten in place
    for got, want in zip(second, runner.run(x[1:2]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not np.allclose(kept[1], second[1])
    strided = np.asfortranarray(x[2:3].astype(np.float64))  # converted, not misread
    np.testing.assert_allclose(chain.run(strided)[1], runner.run(x[2:3])[1], rtol=1e-6)


def test_a_fused_partition_runs_every_boundary_in_one_session(tiny, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    manifest, base, weights = tiny
    runner = BlockRunner(manifest, base, load_profile("x86-dev"))
    fused = runner.bound(fuse=True)
    assert fused is not None and fused.fused
    assert runner.bound(fuse=True) is fused  # built once per runner
    x = RNG.standard_normal((1, 1, 4, 4)).astype(np.float32)
    timings: list[float] = []
    out = fused.run(x, timings)
    assert len(timings) == 1  # one run for the whole partition
    for got, want in zip(out, reference(x, weights), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    per_block = runner.bound(fuse=False)
    assert per_block is not None and not per_block.fused

    import agent.infer.fuse

    def broken(paths: list[Path]) -> bytes:
        raise agent.infer.fuse.FuseError("blocks of different opsets")

    monkeypatch.setattr(agent.infer.fuse, "fuse_blocks", broken)
    other = BlockRunner(manifest, base, load_profile("x86-dev"))
    with caplog.at_level(logging.WARNING):
        fallback = other.bound(fuse=True)
    assert fallback is not None and not fallback.fused and "block by block" in caplog.text
    np.testing.assert_allclose(fallback.run(x)[1], out[1], rtol=1e-5)
    tight = load_profile("x86-dev").model_copy(update={"model_memory_mb": 16})
    big = manifest.model_copy(update={"blocks": tuple(
        b.model_copy(update={"size": 3 * 2**20}) for b in manifest.blocks)})
    with caplog.at_level(logging.INFO):
        unfused = BlockRunner(big, base, tight, verify=False).bound(fuse=True)
    assert unfused is not None and not unfused.fused  # twice the weights would not fit
    assert "profile x86-dev allows 16 MB" in caplog.text


def test_fusing_refuses_blocks_that_do_not_chain(tmp_path: Path) -> None:
    from agent.infer.fuse import FuseError, fuse_blocks

    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"]), helper.make_node("Identity", ["a"], ["c"])],
        "two-outputs", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "odd.onnx")
    with pytest.raises(FuseError, match="one input and one output"):
        fuse_blocks([tmp_path / "odd.onnx", tmp_path / "odd.onnx"])


def test_integer_inputs_are_converted_and_bad_inputs_raise_input_error(tiny) -> None:  # type: ignore[no-untyped-def]
    manifest, base, _ = tiny
    runner = BlockRunner(manifest, base, load_profile("x86-dev"))
    assert runner.run(np.ones((2, 1, 4, 4), np.uint8))[0].dtype == np.float32
    bad_inputs = [
        (np.zeros((1, 4, 4), np.float32), "shape"),          # no batch axis
        (np.zeros((2, 1, 4, 5), np.float32), "shape"),
        (np.zeros((0, 1, 4, 4), np.float32), "empty"),
        (np.full((1, 1, 4, 4), np.inf, np.float32), "NaN or inf"),
        (np.zeros((1, 1, 4, 4), np.complex64), "real number"),
        (np.zeros((1, 1, 4, 4), bool), "real number"),
        ([[0.0] * 16], "not a numpy array"),
    ]
    for x, reason in bad_inputs:
        with pytest.raises(InputError, match=reason):
            runner.run(x)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"shape"):
        runner.run_block(2, np.zeros((1, 3), np.float32))


def test_gpu_profile_falls_back_to_cpu_with_a_warning(tiny, caplog) -> None:  # type: ignore[no-untyped-def]
    manifest, base, _ = tiny
    with caplog.at_level(logging.WARNING, logger="agent.infer.runtime"):
        runner = BlockRunner(manifest, base, load_profile("jetson-orin-nano"))
    assert runner.active_providers == ["CPUExecutionProvider"]
    assert "TensorrtExecutionProvider" in caplog.text and "falling back" in caplog.text
    assert choose_providers(load_profile("jetson-nano"))[-1] == "CPUExecutionProvider"
    assert any("CPU provider runs instead" in w
               for w in check_fit(manifest, load_profile("jetson-nano")))
    assert runner.run(np.zeros((1, 1, 4, 4), np.float32))[1].shape == (1, 3)


def test_runner_is_immutable(tiny) -> None:  # type: ignore[no-untyped-def]
    manifest, base, _ = tiny
    runner = BlockRunner(manifest, base, load_profile("x86-dev"))
    for name in ("manifest", "providers", "input_shape", "_blocks", "new_attribute"):
        with pytest.raises(AttributeError):
            setattr(runner, name, None)
    # a new runner beside the running one shares nothing with it
    other = BlockRunner(manifest, base, load_profile("rpi4"))
    assert other is not runner and other.profile.name == "rpi4"


def test_refuses_what_the_profile_cannot_load(tmp_path: Path) -> None:
    manifest, _ = build_partition(tmp_path / "ir10", ir_version=10, opset=20)
    with pytest.raises(PartitionError, match=r"IR 10.*reads IR <= 9"):
        BlockRunner(manifest, tmp_path / "ir10", load_profile("jetson-nano"))
    assert BlockRunner(manifest, tmp_path / "ir10", load_profile("rpi4")).version == 1
    small = load_profile("rpi4").model_copy(update={"model_memory_mb": 16})
    big = manifest.model_copy(update={"blocks": tuple(
        b.model_copy(update={"size": 10 * 2**20}) for b in manifest.blocks)})
    with pytest.raises(PartitionError, match=r"fewer blocks"):
        check_fit(big, small)


def test_refuses_missing_altered_or_mismatched_block_files(tiny) -> None:  # type: ignore[no-untyped-def]
    manifest, base, _ = tiny
    profile = load_profile("x86-dev")
    data = (base / "block2.onnx").read_bytes()
    (base / "block2.onnx").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(PartitionError, match=r"sha256"):
        BlockRunner(manifest, base, profile)
    (base / "block2.onnx").unlink()
    with pytest.raises(PartitionError, match=r"does not exist"):
        BlockRunner(manifest, base, profile)
    (base / "block2.onnx").write_bytes(data)
    # swapped file names: shapes in the file disagree with the manifest
    swapped = manifest.model_copy(update={"blocks": (
        manifest.blocks[0].model_copy(update={"file": "block2.onnx"}), manifest.blocks[1])})
    with pytest.raises(PartitionError, match=r"do not belong together"):
        BlockRunner(swapped, base, profile, verify=False)
    (base / "block1.onnx").write_bytes(b"not onnx")
    with pytest.raises(PartitionError, match=r"cannot load"):
        BlockRunner(manifest, base, profile, verify=False)


def test_a_partition_of_a_chain_runs_its_own_blocks(tmp_path: Path) -> None:
    manifest, _ = build_partition(tmp_path / "m", first=2, last=2)
    runner = BlockRunner(manifest, tmp_path / "m", load_profile("x86-dev"))
    assert runner.input_shape == (8,) and runner.run(np.ones((2, 8), np.float32))[0].shape == (2, 3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_exported_blocks_run(tmp_path: Path) -> None:
    """The TorchScript exporter (the Jetson Nano target) writes files the runner accepts."""
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(32, 3)).eval()
    path = tmp_path / "block1.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 4, 4),), str(path), input_names=["input"],
                      output_names=["output"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    ir = onnx.load(path).ir_version
    entry = BlockEntry(index=1, file=path.name, sha256=sha256_file(path),
                       size=path.stat().st_size, input_shape=(1, 4, 4), output_shape=(3,))
    manifest = PartitionManifest(model_id="torchy", model_version=1, opset=17, ir_version=ir,
                                 num_blocks=1, boundaries=((1, 4, 4), (3,)), blocks=(entry,))
    runner = BlockRunner(manifest, tmp_path, load_profile("jetson-nano"))
    x = np.random.default_rng(1).standard_normal((3, 1, 4, 4)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner.run(x)[0], want, rtol=1e-4, atol=1e-5)


def test_profile_threads_reach_the_session(tiny) -> None:  # type: ignore[no-untyped-def]
    from agent.infer.runtime import session_options

    profile: FirmwareProfile = load_profile("rpi4")
    opts = session_options(profile)
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1

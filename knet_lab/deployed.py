"""The student a fleet is first deployed with: the zoo student distilled block-wise.

Why not the zoo student as trained on labels (``train.trained_pair``): its blocks learned
their own features, so its boundary activations have nothing to do with the teacher's, and
label-free retraining on device uplinks then has to re-learn every block from scratch.
Measured on digits (the first, one-conv zoo student) under brightness 0.4,
training on the drifted test inputs, ``student+boundary`` mode, 20 epochs: from the zoo
student the candidate scored 71.9 % (below the 83.5 % it replaced, so the gate rejects it);
from this block-wise distilled student 95.2 % against the teacher's 93.3 %. Its blocks
also agree with the teacher's at every boundary, which split inference needs.

A zoo entry with a pretrained teacher (``effnet-lite0``) has no labels to train its student
on: its zoo student is already distilled block-wise from the teacher, and is deployed as is.

Cached next to the zoo weights (``$KNET_CACHE/zoo``), keyed by the zoo cache file, so a
retrained zoo pair gives a new deployed student.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch

from cloud_trainer.models.blocks import BlockModel, ModelPair
from cloud_trainer.models.zoo import zoo_entry
from cloud_trainer.training.distill import train_student_blockwise_from_inputs
from cloud_trainer.training.train import RECIPES, cache_path, train_data, trained_pair

log = logging.getLogger(__name__)
EPOCHS = {"digits": 30, "vision": 5}


def deployed_cache_path(name: str, seed: int = 0, cache_dir: Path | str | None = None) -> Path:
    zoo = cache_path(name, seed, cache_dir)
    return zoo.with_name(zoo.stem + "-blockwise.pt")


def deployed_student(name: str, seed: int = 0, cache_dir: Path | str | None = None,
                     pair: ModelPair | None = None) -> BlockModel:
    """The zoo student after label-free block-wise KT on the training inputs (cached).

    ``student+boundary`` inputs, the zoo recipe's shift augmentation; the trained pair is
    loaded (or trained) first when ``pair`` is not given. Returns a new model in eval mode.
    """
    pair = pair or trained_pair(name, seed, cache_dir)
    if zoo_entry(name).pretrained:  # its zoo student already is the block-wise distilled one
        return copy.deepcopy(pair.student).eval()
    path = deployed_cache_path(name, seed, cache_dir)
    student = copy.deepcopy(pair.student)
    if path.exists():
        try:
            student.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return student.eval()
        except Exception as exc:  # truncated or foreign: distil again
            log.warning("deployed-student cache %s unusable (%s); distilling again", path, exc)
    x, _ = train_data(name, seed)
    res = train_student_blockwise_from_inputs(
        pair.teacher, pair.student, x, inputs="student+boundary", epochs=EPOCHS[name],
        lr=RECIPES[name].lr, shift=RECIPES[name].shift, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(res.student.state_dict(), tmp)
    tmp.replace(path)
    log.info("distilled the deployed %s student in %.1f s -> %s", name, res.seconds, path)
    return res.student.eval()


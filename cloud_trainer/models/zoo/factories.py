"""Factories for ``--model package.module:factory``: the pretrained EfficientNet-Lite0 as
one plain module, so ``knet cuts`` / ``knet plan bench`` cut it at traced candidates."""

from __future__ import annotations

from cloud_trainer.models.zoo.efficientnet_lite import EfficientNetLite, pretrained_lite0


def _lite0(size: int) -> EfficientNetLite:
    model = pretrained_lite0(size)
    model.input_shape = (3, size, size)  # what cloud_trainer.models.zoo.refs reads
    return model


def lite0_96() -> EfficientNetLite:
    """ImageNet EfficientNet-Lite0 for 96×96 inputs
    (``cloud_trainer.models.zoo.factories:lite0_96``)."""
    return _lite0(96)


def lite0_224() -> EfficientNetLite:
    """ImageNet EfficientNet-Lite0 at its native 224×224."""
    return _lite0(224)

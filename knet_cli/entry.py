"""The ``knet`` console script, behind the same guard as ``knet-trainer``
(cloud_trainer/entry.py): without the trainer's dependencies it refuses in one line."""

from __future__ import annotations

from cloud_trainer.entry import missing, refuse


def knet() -> int:
    absent = missing("knet")
    if absent:
        return refuse("knet", absent)
    from knet_cli.main import main

    return main()

"""Replicas split the fleet by a stable hash: each device has exactly one owner, spread."""

from __future__ import annotations

import pytest

from cloud_trainer.ingest.partition import DevicePartition


def test_each_device_has_one_owner_and_the_split_is_even() -> None:
    devices = [f"cam-{i:03d}" for i in range(600)]
    for n in (1, 2, 3, 5):
        owners = [[DevicePartition(n, k).owns(d) for k in range(n)] for d in devices]
        assert all(sum(o) == 1 for o in owners)
        shares = [sum(o[k] for o in owners) for k in range(n)]
        assert min(shares) > 0.8 * len(devices) / n, shares  # counters do not cluster
    assert DevicePartition(3, 1).owner("cam-7") == DevicePartition(3, 0).owner("cam-7")
    with pytest.raises(ValueError, match="replica 2 of 2"):
        DevicePartition(2, 2)

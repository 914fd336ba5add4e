"""`knet bench update` runs end to end (smallest setting) and records what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knet_cli.main import main

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]


def test_bench_update_smallest_run(tmp_path: Path) -> None:
    out = tmp_path / "update.json"
    assert main(["bench", "update", "--devices", "2", "--changes", "one-block",
                 "--repeats", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    (fleet,) = record["results"]["fleet"]
    assert fleet["devices"] == 2 and fleet["device_block_bytes"] == 2 * fleet[
        "changed_block_bytes"]  # each device fetched the one changed block, nothing else
    assert fleet["pushed_bytes"] == fleet["changed_block_bytes"]
    (stall,) = record["results"]["stall"]
    assert stall["repeats"] == 1 and stall["inferences_during_median"] > 0

"""The device side must run on images without torch: importing any agent module must not
pull it in, directly or through a dependency."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO

BLOCK_TORCH = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is forbidden on the device side (imported: %s)" % name)
            return None

    sys.meta_path.insert(0, BlockTorch())
    import agent
    names = sorted(m.name for m in pkgutil.walk_packages(agent.__path__, "agent."))
    for name in names:
        importlib.import_module(name)
    assert "torch" not in sys.modules
    print(len(names))
    """
)


def test_every_agent_module_imports_without_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 4  # the walk really found the package's modules


def test_the_guard_itself_catches_a_torch_import() -> None:
    code = BLOCK_TORCH.replace("import agent\n", "import agent\nimport torch\n", 1)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "forbidden on the device side" in proc.stderr

"""The package contracts in pyproject.toml's ``[tool.importlinter]``, checked by
``lint-imports`` on every ``make test`` (so in CI): ``agent``, the device side, imports no
``cloud_trainer``, ``bench``, ``knet_cli``, ``knet_lab`` or ``torch`` (imports inside
functions count); ``cloud_trainer`` imports neither the operator CLI (``knet_cli``), the lab
(``knet_lab``) nor ``bench``, which only ``knet_cli`` imports; ``agent``'s stages (cli,
service, update, infer, mqtt, wire) are layers, and its modules and subpackages import
one another without a cycle."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

from conftest import REPO, tool


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([tool("lint-imports"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def add_package(root: Path, name: str, code: str = "") -> None:
    """``name`` (dotted) under ``root`` as a package, its parents too; ``code`` is appended
    to its ``__init__.py``."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        root.joinpath(*parts[:i]).mkdir(exist_ok=True)
        with root.joinpath(*parts[:i], "__init__.py").open("a") as init:
            init.write(code if i == len(parts) else "")


def test_the_package_contracts_hold() -> None:
    done = lint_imports(REPO, REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_the_contracts_catch_imports_inside_functions_and_cycles(tmp_path: Path) -> None:
    """The same contracts on a copy of the layout whose agent breaks each of them, only
    inside functions: all three are reported."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    for pkg in config["root_packages"]:
        add_package(tmp_path, pkg)
    for contract in config["contracts"]:  # what the contracts name, and the imports they ignore
        for layer in [*contract.get("ancestors", []), *contract.get("layers", [])]:
            for name in re.split("[|:]", layer):
                add_package(tmp_path, name.strip("() "))
        for ignored in contract.get("ignore_imports", []):
            importer, imported = (m.strip() for m in ignored.split("->"))
            add_package(tmp_path, imported)
            add_package(tmp_path, importer, f"def check():\n    import {imported}\n")
    (tmp_path / "cloud_trainer" / "zoo.py").write_text("")
    (tmp_path / "agent" / "infer" / "chain.py").write_text(
        "def relay():\n    from agent.infer import sources\n    return sources\n")
    (tmp_path / "agent" / "infer" / "sources.py").write_text(
        "def make_source():\n    from agent.infer.chain import relay\n"
        "    import torch\n    from cloud_trainer import zoo\n    return relay, torch, zoo\n")
    # the [tool.importlinter] tables, the last of pyproject.toml, as they are
    section = (REPO / "pyproject.toml").read_text().split("\n[tool.importlinter]\n", 1)[1]
    # less the layers contracts: they name cloud_trainer's real subpackages
    head, *tables = section.split("[[tool.importlinter.contracts]]")
    section = "[[tool.importlinter.contracts]]".join(
        [head, *(t for t in tables if 'type = "layers"' not in t)])
    (tmp_path / "pyproject.toml").write_text("[tool.importlinter]\n" + section)
    done = lint_imports(tmp_path, tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "agent.infer.sources -> torch" in out
    assert "agent.infer.sources -> cloud_trainer.zoo" in out
    assert "2 broken" in out and "No cycles are allowed in agent" in out

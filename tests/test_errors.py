"""One root exception per package: every exception class that ``agent``, ``cloud_trainer``
or ``broker`` defines derives from its package's root, and keeps the builtin base that
callers catch it by."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from agent.errors import KnetAgentError
from broker.errors import KnetBrokerError
from cloud_trainer.errors import KnetTrainerError

ROOTS = {"agent": KnetAgentError, "cloud_trainer": KnetTrainerError, "broker": KnetBrokerError}


def defined_exceptions(package: str) -> list[type[BaseException]]:
    pkg = importlib.import_module(package)
    found = []
    for info in pkgutil.walk_packages(pkg.__path__, f"{package}."):
        if ".migrations" in info.name:  # Alembic scripts run only inside Alembic
            continue
        module = importlib.import_module(info.name)
        found += [obj for _name, obj in inspect.getmembers(module, inspect.isclass)
                  if issubclass(obj, BaseException) and obj.__module__ == info.name]
    return found


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_every_exception_of_a_package_derives_from_its_root(package: str) -> None:
    classes = defined_exceptions(package)
    assert len(classes) >= 3  # the walk found the package's exceptions
    strays = [f"{c.__module__}.{c.__qualname__}" for c in classes
              if not issubclass(c, ROOTS[package])]
    assert not strays, f"not under {ROOTS[package].__name__}: {strays}"


def test_the_builtin_bases_stay() -> None:
    from agent.infer.manifest import ManifestError
    from agent.mqtt.spool import SpoolError
    from agent.update.update_manifest import UpdateRejected
    from agent.wire.codec import CodecError
    from cloud_trainer.release.keys import KeyExistsError
    from cloud_trainer.release.registry import RegistryError

    assert issubclass(CodecError, ValueError) and issubclass(ManifestError, ValueError)
    assert issubclass(SpoolError, RuntimeError) and issubclass(RegistryError, RuntimeError)
    assert issubclass(KeyExistsError, FileExistsError)
    assert issubclass(KeyExistsError, KnetTrainerError) and issubclass(KeyExistsError,
                                                                       KnetAgentError)
    err = UpdateRejected("malformed", "x")
    assert isinstance(err, KnetAgentError) and err.reason == "malformed"

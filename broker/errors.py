"""The root of the broker tooling's exceptions (provisioning, certificates, the launcher);
each keeps the builtin base it had before (``RuntimeError``)."""

from __future__ import annotations


class KnetBrokerError(Exception):
    """Base class of every exception defined in the ``broker`` package."""

"""The root of the trainer's exceptions.

Every error the cloud side raises on purpose derives from ``KnetTrainerError``; each one
keeps the builtin base it had before (``ValueError``, ``RuntimeError``, ``FileExistsError``),
so code that catches it by that builtin type still does. Errors of the agent code the trainer
uses (manifests, codecs, configuration files) derive from ``agent.errors.KnetAgentError``.
"""

from __future__ import annotations


class KnetTrainerError(Exception):
    """Base class of every exception defined in the ``cloud_trainer`` package."""

"""The root of the agent's exceptions.

Every error the agent raises on purpose derives from ``KnetAgentError``, so a caller can catch
all of them (and nothing else) in one clause. Each one keeps the builtin base it had before
(``ValueError`` for bad input, ``RuntimeError`` for a failed operation), so code that catches
it by that builtin type still does.
"""

from __future__ import annotations


class KnetAgentError(Exception):
    """Base class of every exception defined in the ``agent`` package."""

"""Every exception serialmuxd raises on purpose, in one place.

Each carries a message written for a person: what happened and what to do next.
"""

from __future__ import annotations


class SerialmuxdError(Exception):
    """Base class: the message is shown to users as is."""


class ConfigError(SerialmuxdError):
    """The configuration file is invalid; the message names the file and key path."""


class BackendDown(SerialmuxdError):
    """The UART backend is not connected (VM stopped, socket missing, device gone)."""


class ActionUnsupported(SerialmuxdError):
    """The backend cannot do this action (e.g. NMI without a QMP socket)."""


class ActionFailed(SerialmuxdError):
    """The backend tried the action and it failed."""


class RingLogError(SerialmuxdError):
    """A ring log file could not be used (corrupt, wrong size, unwritable)."""

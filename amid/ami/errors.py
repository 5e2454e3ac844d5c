"""The session's exceptions (re-exported by :mod:`amid.ami.session` and :mod:`amid`)."""

from __future__ import annotations

__all__ = ["AMIConnectionError", "AMIError", "ActionTimeout", "LoginError"]


class AMIError(Exception):
    """Base class of session errors."""


class AMIConnectionError(AMIError):
    """Not connected, or the connection was lost while waiting."""


class LoginError(AMIError):
    """Asterisk refused the login (Asterisk says the same for bad user, secret or key)."""


class ActionTimeout(AMIError, TimeoutError):
    """No (complete) answer to an action within its timeout."""

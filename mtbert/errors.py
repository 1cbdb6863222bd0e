"""The errors a user can fix: bad input or configuration. ``train.main`` turns any of them
into one line on stderr and exit code 2 (never a traceback); the message names the file and
line, or the config field, and what to do."""

from __future__ import annotations

EXIT_USER_ERROR = 2  # bad input or config (EX_USAGE-like; what argparse uses too)


class UserError(ValueError):
    """Bad input or configuration; the message names the file:line or the field."""


class ConfigError(UserError):
    """A bad configuration value; the message names the field."""

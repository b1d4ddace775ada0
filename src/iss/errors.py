"""The errors that are the user's to fix: a bad config or bad data. The CLI shows them as one line and exits 2;
any other exception is a bug in iss (or its environment) and keeps its traceback."""

from __future__ import annotations


class IssError(Exception):
    """A problem with the user's config or data, explained in its message."""


class ConfigError(IssError, ValueError):
    """The config asks for something that cannot be done (unknown key, wrong layer, mismatched files)."""


class DataError(IssError, ValueError):
    """A task or corpus file cannot be used as it is."""

"""The errors the command line turns into one line and an exit code (no torch import here)."""


class UsageError(Exception):
    """A mistake in what the user asked for (exit code 2); str() is the one-line message."""


class Quiet(Exception):
    """On a rank other than 0: rank 0 reported an error (and printed it); exit quietly."""


class NotJoined(UsageError):
    """A rank's error found before it joined the launch's process group: rank 0 cannot report
    it, so every rank prints its own (the other ranks printed nothing, and the rank that failed
    exited with status 2 in silence)."""

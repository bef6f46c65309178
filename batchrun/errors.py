"""Errors that map to exit codes. The CLI turns each into one message and its code."""


class BatchrunError(Exception):
    exit_code = 1


class SpecError(BatchrunError):
    """A bad job file or unreadable input: found before any work starts."""

    exit_code = 2


class JobFailed(BatchrunError):
    """The job ran but did not finish every shard (quarantined shards, stall, no workers)."""

    exit_code = 1


class OutputLocked(BatchrunError):
    """Another run holds the output directory."""

    exit_code = 3

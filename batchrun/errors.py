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


class JobInterrupted(BatchrunError):
    """A stop signal drained the job: what finished is committed, the rest was handed back; a re-run resumes."""

    def __init__(self, message: str, signal_name: str = "SIGINT"):
        super().__init__(message)
        self.exit_code = 143 if signal_name == "SIGTERM" else 130  # 128 + the signal's number, as shells report it

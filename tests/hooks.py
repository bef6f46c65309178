"""Custom scorer hooks for tests, named in job files as module:function."""


def length_ratio(text, row):
    """Score = generated length / reference length (a made-up metric); None for error rows."""
    return None if text is None else len(text) / max(1, len(str(row["answer"])))

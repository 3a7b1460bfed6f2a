"""Exceptions. A `FlexQuantError` is a user error: the CLI prints its message on one line and exits 2."""


class FlexQuantError(Exception):
    """A problem with the user's input (model, text, config, checkpoint) and how to fix it."""


class CheckpointError(FlexQuantError):
    """A checkpoint folder that is missing pieces, corrupted, tampered with or of an unknown version."""

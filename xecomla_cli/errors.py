"""The one exception type the CLI turns into a single-line error and a non-zero exit."""


class XecomlaError(Exception):
    """A user-facing error: one line saying what is wrong and what to do."""

"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A bad input, reported as one line that names the problem and the fix."""

"""The data package's user error, in a module of its own so the package's modules can raise it
without importing the package (whose __init__ imports them: that would be an import cycle)."""


class DataError(ValueError):
    """A problem with the input data, described in one line naming the file or field."""

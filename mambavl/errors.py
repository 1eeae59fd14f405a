"""Error types shared by every stage."""


class InputError(ValueError):
    """Bad user input: the message names the file, row and field (or attribute) at fault.

    The CLI turns it into exit code 2; library callers can catch it as a ``ValueError``.
    """

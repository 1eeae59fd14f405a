"""Error types shared by every stage."""


class InputError(ValueError):
    """Bad user input: the message names the file, row and field (or attribute) at fault.

    The CLI turns it into exit code 2; library callers can catch it as a ``ValueError``.
    """


class TrainingStopped(RuntimeError):
    """Training cannot go on and must not pretend to: a non-finite loss or weights (the message names the epoch and
    step), or a checkpoint that could not be written. The run's last good checkpoint is kept as it was.

    The CLI turns it into exit code 4.
    """

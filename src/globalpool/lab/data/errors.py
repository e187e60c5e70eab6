"""The one error type every dataset loader raises."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset could not be loaded; the message is one line saying what and where.

    A subclass of ``ValueError`` so callers that catch bad arguments in general also catch it;
    the CLI catches it to print the message and exit non-zero without a traceback.

    >>> str(DatasetError("cifar10: missing test_batch in /data"))
    'cifar10: missing test_batch in /data'
    """

    def __init__(self, message: str) -> None:
        # Keep messages on one line, whatever an underlying exception put in them.
        super().__init__(" ".join(str(message).split()))

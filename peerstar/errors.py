"""The user-facing error type shared by every peerstar module.

A `PeerstarError` carries a message that says which input is wrong, what is wrong
with it and what to do; the CLI prints it on one line and exits non-zero, with no
traceback. Library modules subclass it so callers can catch one type.
"""


class PeerstarError(Exception):
    """An error with a message fit to show a user as it is."""

    exit_code = 1

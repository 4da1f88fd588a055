"""The one exception type users see: its message is meant to be acted on, never a traceback."""


class LorasaeError(Exception):
    """A problem the user can fix (bad path, incompatible SAE, missing package, ...).

    The CLI prints ``error: <message>`` on one line and exits with status 2; the service maps it to a
    4xx JSON error.
    """

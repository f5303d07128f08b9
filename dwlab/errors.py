"""The one exception type the CLI turns into a one-line message and exit code 2."""


class DwlabError(Exception):
    """A user-facing error: bad config, bad data, bad sweep file, unreachable store.

    The message is one line that names the bad value and where it came from
    (file, key, annotation id). The CLI prints it as ``error: <message>`` and exits 2.
    """


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or Inf; the message names the iteration and every loss term."""

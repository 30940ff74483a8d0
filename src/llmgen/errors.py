"""The one error type a user can cause. The CLI prints its message as one line and exits 2."""


class LlmgenError(Exception):
    """A problem with the user's input: bad config, missing file, malformed data.

    The message names what is wrong, where, and how to fix it. It is shown without a traceback.
    """

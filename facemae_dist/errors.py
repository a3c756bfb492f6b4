"""The toolkit's own error type: failures a user can cause and fix."""


class FacemaeError(Exception):
    """A problem with the user's input (path, config, data). The message names the thing and the fix.

    The CLI prints it without a traceback and exits with status 2.
    """

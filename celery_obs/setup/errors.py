"""The one error the setup commands report to the user."""


class SetupError(Exception):
    """The setup could not be done; the message is for the user."""

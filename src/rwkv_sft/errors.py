"""The one exception type for problems a user can fix (bad files, bad settings)."""


class UserError(Exception):
    """Printed by the CLI as a single line (no traceback) with a non-zero exit code."""

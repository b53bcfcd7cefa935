"""The two kinds of failure a user sees: their input is wrong (exit 2) or the run failed (exit 1)."""


class AttribError(Exception):
    """A failure reported as one line `error: …`; `exit_code` says whose fault it was."""

    exit_code = 1


class InputError(AttribError):
    """Bad usage or input: a missing file, a wrong column, mismatched artefacts."""

    exit_code = 2


class RunError(AttribError):
    """A failure at run time that is not the input's fault."""

    exit_code = 1

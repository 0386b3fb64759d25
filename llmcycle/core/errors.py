"""Errors the CLI turns into one clear line and an exit code.

UserError (exit 2) is for anything the user can fix: a missing file, a bad key, data that does not
parse. Any other exception is an internal error (exit 1); the CLI prints a traceback only with --debug.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, project file, data or model; exit status 2."""

    exit_code = 2


def suggest(name: str, candidates) -> str:
    """' (did you mean 'x'?)' for the nearest candidate, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""

"""The error types lorakit raises for problems a user can fix, and their exit codes.

The CLI prints these as one message (no traceback unless LORAKIT_DEBUG=1) and exits with `exit_code`.
Anything else that escapes is a lorakit bug or a failed run (exit 1).
"""

from __future__ import annotations


class LorakitError(Exception):
    """A problem with the user's input: recipe, data, paths, or hardware choice. Exit code 2."""

    exit_code = 2


class RecipeError(LorakitError):
    """The recipe file or a --set override is malformed or invalid."""


class DataError(LorakitError):
    """A dataset file is missing, malformed, or does not fit the chosen format."""


class ModelError(LorakitError):
    """The model, tokenizer or LoRA settings do not fit each other (for example unmatched target modules)."""


class RunFailed(Exception):
    """A run started but failed (exit code 1)."""

    exit_code = 1


class Interrupted(Exception):
    """A run stopped on SIGTERM (exit 143) or SIGINT (exit 130) after writing a complete checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

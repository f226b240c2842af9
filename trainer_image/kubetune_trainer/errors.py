"""Failures the trainer understands, each with its exit code and report reason.

Anything raised as a `TrainerFailure` ends the run with a short message in the
termination log (no stack trace); anything else is a `TrainerError`.
"""

from __future__ import annotations

from kubetune.api.trainer import EXIT_INPUT_NOT_FOUND, EXIT_INVALID_CONFIG, EXIT_INVALID_DATASET

EXIT_TRAINER_ERROR = 1


class TrainerFailure(Exception):
    """A failure with a message meant for the user."""

    reason = "TrainerError"
    exit_code = EXIT_TRAINER_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidConfig(TrainerFailure):
    """The configuration cannot be used (exit 64)."""

    reason = "InvalidConfig"
    exit_code = EXIT_INVALID_CONFIG


class InvalidDataset(TrainerFailure):
    """The dataset is malformed (exit 65)."""

    reason = "InvalidDataset"
    exit_code = EXIT_INVALID_DATASET


class InputNotFound(TrainerFailure):
    """The model or dataset does not exist (exit 66)."""

    reason = "InputNotFound"
    exit_code = EXIT_INPUT_NOT_FOUND


class Interrupted(Exception):
    """SIGTERM arrived; a checkpoint was saved and the run should stop."""

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved")
        self.step = step

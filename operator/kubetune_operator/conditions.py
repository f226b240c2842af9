"""Condition types and reasons (named constants), and the one helper that sets them."""

from __future__ import annotations

from datetime import datetime

from kubetune.api.common import Condition, ConditionStatus

# Types
DATASET_VALIDATED = "DatasetValidated"
SUSPENDED = "Suspended"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
REGISTERED = "Registered"
EVALUATED = "Evaluated"  # spec.evaluation ran (True) or failed (False); the model is kept
FAILED = "Failed"
CANCELLED = "Cancelled"
# A ModelMerge's: its models exist and can be merged.
MODELS_READY = "ModelsReady"
# The summary, for generic tools (kubectl wait --for=condition=Ready, Argo CD, kstatus):
# True once the job succeeded (and its model is registered), else False with the phase.
READY = "Ready"

# Reasons
VALIDATING = "Validating"
DATASET_VALID = "DatasetValid"
VALIDATION_SKIPPED = "ValidationSkipped"
SUSPENDED_BY_USER = "SuspendedByUser"
WAITING_FOR_QUEUE = "WaitingForQueue"
NOT_SUSPENDED = "NotSuspended"
TRAINER_RUNNING = "TrainerRunning"
POD_PENDING = "PodPending"
UNSCHEDULABLE = "Unschedulable"
IMAGE_PULL_BACKOFF = "ImagePullBackOff"
PREEMPTED = "Preempted"
RESTARTING = "Restarting"  # a multi-pod attempt ended early: all pods start again
NOT_STARTED = "NotStarted"
STOPPED = "Stopped"
TRAINING_COMPLETE = "TrainingComplete"
MODEL_REGISTERED = "ModelRegistered"
EVALUATION_COMPLETE = "EvaluationComplete"
EVALUATION_FAILED = "EvaluationFailed"
REGISTRATION_DISABLED = "RegistrationDisabled"
CANCELLED_BY_USER = "CancelledByUser"
NAME_TAKEN = "NameTaken"  # the RegisteredModel's name records another job's model
NAME_FREE = "NameFree"  # the name taken before is free again
NAME_CONFLICT = "NameConflict"  # a child's name is held by an object this job does not own
CREATE_REFUSED = "CreateRefused"  # the API server refused a child (quota, admission policy)
# A ModelMerge's reasons.
MODEL_NOT_FOUND = "ModelNotFound"  # a model to merge is not registered (yet)
MODEL_UNREADABLE = "ModelUnreadable"  # its record does not parse
INCOMPATIBLE_MODELS = "IncompatibleModels"
MODELS_COMPATIBLE = "ModelsCompatible"
MERGE_RUNNING = "MergeRunning"
MERGE_COMPLETE = "MergeComplete"
MERGE_FAILED = "MergeFailed"

# True, but nothing happened: no event.
QUIET_REASONS = {VALIDATION_SKIPPED}
WARNING_REASONS = {
    IMAGE_PULL_BACKOFF,
    UNSCHEDULABLE,
    PREEMPTED,
    RESTARTING,
    NAME_TAKEN,
    NAME_CONFLICT,
    CREATE_REFUSED,
    EVALUATION_FAILED,
    MODEL_NOT_FOUND,
    INCOMPATIBLE_MODELS,
    MERGE_FAILED,
}


class Conditions:
    """A job's conditions, updated per the API conventions: lastTransitionTime
    moves only when status changes; observedGeneration always follows."""

    def __init__(self, existing: list[Condition], generation: int, now: datetime) -> None:
        self._by_type = {c.type: c for c in existing}
        self._order = [c.type for c in existing]
        self.generation = generation
        self.now = now

    def set(self, type_: str, status: bool | None, reason: str, message: str = "") -> None:
        value = ConditionStatus.UNKNOWN if status is None else ConditionStatus(str(bool(status)))
        current = self._by_type.get(type_)
        transition = (
            self.now if current is None or current.status != value else current.last_transition_time
        )
        self._by_type[type_] = Condition(
            type=type_,
            status=value,
            reason=reason,
            message=message[:32768],
            last_transition_time=transition,
            observed_generation=self.generation,
        )
        if type_ not in self._order:
            self._order.append(type_)

    def get(self, type_: str) -> Condition | None:
        return self._by_type.get(type_)

    def is_true(self, type_: str) -> bool:
        condition = self._by_type.get(type_)
        return condition is not None and condition.status == ConditionStatus.TRUE

    def reason(self, type_: str) -> str | None:
        condition = self._by_type.get(type_)
        return condition.reason if condition else None

    def as_list(self) -> list[Condition]:
        return [self._by_type[t] for t in self._order]


def set_ready(conds: Conditions, phase: str, message: str) -> None:
    """Ready follows the phase: True only for a job that succeeded, the phase otherwise."""
    done = phase == "Succeeded"
    conds.set(READY, done, phase, message if not done else "trained and registered")

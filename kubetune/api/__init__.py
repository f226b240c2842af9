"""The kubetune.dev/v1alpha1 API: FineTuningJob, RegisteredModel and the trainer contract.

These models import nothing else of kubetune: everything else imports them.
"""

from kubetune.api.common import API_VERSION, GROUP, VERSION, Condition, SecretKeyRef, VolumeLocation
from kubetune.api.finetuningjob import (
    DatasetFormat,
    Failure,
    FailureReason,
    FineTuningJob,
    FineTuningJobSpec,
    FineTuningJobStatus,
    FineTuningMethod,
    Hyperparameters,
    Phase,
    Progress,
    ResolvedHyperparameters,
)
from kubetune.api.registeredmodel import RegisteredModel, RegisteredModelSpec

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "Condition",
    "DatasetFormat",
    "Failure",
    "FailureReason",
    "FineTuningJob",
    "FineTuningJobSpec",
    "FineTuningJobStatus",
    "FineTuningMethod",
    "Hyperparameters",
    "Phase",
    "Progress",
    "RegisteredModel",
    "RegisteredModelSpec",
    "ResolvedHyperparameters",
    "SecretKeyRef",
    "VolumeLocation",
]

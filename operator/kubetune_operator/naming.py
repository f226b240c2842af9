"""Names and labels of the objects the operator creates for a FineTuningJob."""

from __future__ import annotations

import hashlib

MANAGER = "kubetune-operator"
FIELD_MANAGER = MANAGER

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB_UID = "kubetune.dev/job-uid"
LABEL_JOB_NAME = "kubetune.dev/job-name"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# On Kueue's Workloads: the UID of the Job they stand for.
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_VERSION = "v1beta2"
# On a FineTuningSweep's trials (FineTuningJobs) and their RegisteredModels.
LABEL_SWEEP_NAME = "kubetune.dev/sweep"
LABEL_SWEEP_UID = "kubetune.dev/sweep-uid"
LABEL_SWEEP_BEST = "kubetune.dev/sweep-best"  # "true" on the best trial's RegisteredModel
# On a merged RegisteredModel: the ModelMerge that made it.
LABEL_MERGE_UID = "kubetune.dev/merge-uid"

ANNOTATION_SPEC_HASH = "kubetune.dev/spec-hash"
# On multi-pod training Jobs and their pods: how many times all pods were restarted.
ANNOTATION_RESTART = "kubetune.dev/restart"
# Set by the Job controller on the pods of an Indexed Job.
ANNOTATION_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# On trainer pods: the FineTuningJob they work for (labels cap names at 63 characters).
ANNOTATION_OWNER = "kubetune.dev/finetuningjob"
# On trainer pods: the trainer's configuration (JSON), projected as a file.
ANNOTATION_TRAINER_CONFIG = "kubetune.dev/trainer-config"

# On a sweep's trials: the trial's number and the values it tries (JSON).
ANNOTATION_TRIAL_NUMBER = "kubetune.dev/trial-number"
ANNOTATION_TRIAL_PARAMETERS = "kubetune.dev/trial-parameters"
ANNOTATION_STOPPED_EARLY = "kubetune.dev/stopped-early"  # "true": cancelled by the median rule
# On a merge Job's pods: the ModelMerge they work for.
ANNOTATION_MERGE = "kubetune.dev/modelmerge"

COMPONENT_TRAINER = "trainer"
COMPONENT_VALIDATOR = "dataset-validator"
COMPONENT_MERGER = "model-merger"

# A Job's name ends up in a label of its pods: at most 63 characters.
_MAX_NAME = 63


def child_name(owner: str, suffix: str) -> str:
    """`<owner>-<suffix>`, shortened with a stable hash when over 63 characters."""
    name = f"{owner}-{suffix}"
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(owner.encode()).hexdigest()[:8]
    keep = _MAX_NAME - len(suffix) - len(digest) - 2
    return f"{owner[:keep].rstrip('-.')}-{digest}-{suffix}"


def train_job_name(owner: str) -> str:
    return child_name(owner, "train")


def rendezvous_service_name(owner: str) -> str:
    """The headless Service giving a multi-pod job's pods stable DNS names. Service names
    must start with a letter; FineTuningJob names may not."""
    name = child_name(owner, "workers")
    return name if name[0].isalpha() else child_name(f"t{owner}"[:_MAX_NAME], "workers")


def trial_name(sweep: str, number: int) -> str:
    """Trial N of a sweep: the same name for the same number, always."""
    return child_name(sweep, f"t{number}")


def merge_job_name(owner: str) -> str:
    return child_name(owner, "merge")


def validate_job_name(owner: str) -> str:
    return child_name(owner, "validate")


def label_value(value: str) -> str:
    """A label value (at most 63 characters) that still identifies `value`."""
    return value if len(value) <= _MAX_NAME else child_name(value[:40], "x")[:_MAX_NAME]


def labels(owner: str, uid: str, component: str) -> dict[str, str]:
    return {
        LABEL_NAME: "kubetune",
        LABEL_INSTANCE: label_value(owner),
        LABEL_COMPONENT: component,
        LABEL_PART_OF: "kubetune",
        LABEL_MANAGED_BY: MANAGER,
        LABEL_JOB_NAME: label_value(owner),
        LABEL_JOB_UID: uid,
    }


def owner_reference(body: dict) -> dict:
    """Makes the FineTuningJob own a child: deleting the job deletes the child."""
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": body["metadata"]["name"],
        "uid": body["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }

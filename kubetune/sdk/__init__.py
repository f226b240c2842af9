"""The kubetune Python SDK: fine-tuning jobs on a cluster or on this machine.

from kubetune.fine_tuning import FineTuningConfig, FineTuningMethod, DatasetFormat
from kubetune.fine_tuning import get_model_fine_tuner

tuner = get_model_fine_tuner()
job_id = await tuner.create_fine_tuning_job(FineTuningConfig(...))
result = await tuner.wait_for_completion(job_id)
model_id = await tuner.register_fine_tuned_model(job_id)

merge = await tuner.merge_models("both", {"model-a": 1.0, "model-b": 1.0}, "ties", output="models")
merged = (await tuner.wait_for_merge(merge))["status"]["registeredModel"]
"""

from kubetune.api.merge import MergeFormat, MergeMethod
from kubetune.sdk.backends import ClusterBackend, LocalBackend
from kubetune.sdk.cluster import ClusterError
from kubetune.sdk.config import (
    ADDITIONAL_PARAMS,
    DatasetFormat,
    FineTuningConfig,
    FineTuningMethod,
    new_job_id,
    to_job,
)
from kubetune.sdk.merges import InvalidMerge, check_model_merge, merge_manifest
from kubetune.sdk.results import FineTuningResult
from kubetune.sdk.tuner import ModelFineTuner, get_model_fine_tuner

__all__ = [
    "ADDITIONAL_PARAMS",
    "ClusterBackend",
    "ClusterError",
    "DatasetFormat",
    "FineTuningConfig",
    "FineTuningMethod",
    "FineTuningResult",
    "InvalidMerge",
    "LocalBackend",
    "MergeFormat",
    "MergeMethod",
    "ModelFineTuner",
    "check_model_merge",
    "get_model_fine_tuner",
    "merge_manifest",
    "new_job_id",
    "to_job",
]

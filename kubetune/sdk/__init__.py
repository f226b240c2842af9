"""The kubetune Python SDK: fine-tuning jobs on a cluster or on this machine.

from kubetune.fine_tuning import FineTuningConfig, FineTuningMethod, DatasetFormat
from kubetune.fine_tuning import get_model_fine_tuner

tuner = get_model_fine_tuner()
job_id = await tuner.create_fine_tuning_job(FineTuningConfig(...))
result = await tuner.wait_for_completion(job_id)
model_id = await tuner.register_fine_tuned_model(job_id)
"""

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
    "LocalBackend",
    "ModelFineTuner",
    "get_model_fine_tuner",
    "new_job_id",
    "to_job",
]

"""Fine-tuning from Python (the ModelFineTuner API); see kubetune.sdk."""

from kubetune.sdk import (
    ADDITIONAL_PARAMS,
    ClusterBackend,
    ClusterError,
    DatasetFormat,
    FineTuningConfig,
    FineTuningMethod,
    FineTuningResult,
    LocalBackend,
    ModelFineTuner,
    get_model_fine_tuner,
)

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
]

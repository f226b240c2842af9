"""TRL's SFTTrainer, configured from the resolved hyperparameters.

The examples arrive tokenized, with labels (-100 where no loss is taken, EOS
always learned), so TRL only collates them: padding-free (a micro-batch
flattened into one row, position_ids restarting per example), BFD-packed, or
padded. transformers' Trainer normalises the loss by the label tokens of the
whole accumulation window and of every process, so k micro-batches or k
processes give the gradient of one batch k times as large.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kubetune.api.finetuningjob import PackingStrategy, Precision, ResolvedHyperparameters
from kubetune_trainer.encoding import Example
from kubetune_trainer.modeling import upcast_trainable


def to_dataset(examples: Sequence[Example]):
    import datasets

    return datasets.Dataset.from_dict(
        {
            "input_ids": [list(e.input_ids) for e in examples],
            "labels": [list(e.labels) for e in examples],
        }
    )


def sft_arguments(
    hp: ResolvedHyperparameters,
    *,
    output_dir: Path,
    on_cpu: bool,
    has_eval: bool,
    collective_timeout_seconds: int,
    fsdp: dict,
    evaluate_first: bool = False,
):
    from trl import SFTConfig

    strategy = hp.packing_strategy
    if has_eval:
        evaluation = {"eval_strategy": "steps", "eval_steps": hp.eval_steps}
        if hp.eval_steps is None:
            evaluation = {"eval_strategy": "epoch"}
        # The held-out loss before training, the baseline the fine-tune must beat, from
        # inside train(): an evaluate() before it would leave DDP's gradients unsynced.
        evaluation["eval_on_start"] = evaluate_first
    else:
        evaluation = {"eval_strategy": "no"}
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_scheduler.value,
        warmup_steps=hp.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        bf16=hp.precision == Precision.BF16,
        fp16=hp.precision == Precision.FP16,
        use_cpu=on_cpu,
        # TRL turns checkpointing on by default; it costs a third more compute and is
        # only worth it when memory needs it, which `auto` decided already.
        activation_checkpointing=hp.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        padding_free=strategy == PackingStrategy.PADDING_FREE,
        packing=strategy == PackingStrategy.BFD,
        packing_strategy="bfd",
        # The examples are truncated already; BFD needs the row length.
        max_length=hp.max_seq_length if strategy == PackingStrategy.BFD else None,
        train_sampling_strategy="group_by_length"
        if strategy == PackingStrategy.PADDED
        else "random",
        use_liger_kernel=hp.liger_kernel,
        **evaluation,
        save_strategy="steps",
        save_steps=hp.save_steps,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=hp.logging_steps,
        report_to="none",
        disable_tqdm=True,
        seed=hp.seed,
        data_seed=hp.seed,
        ddp_timeout=collective_timeout_seconds,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        **fsdp,
    )


def _epoch_seeded_sampler_class():
    import math

    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    class EpochSeededSampler(torch.utils.data.Sampler):
        """The order of training examples as a function of (seed, epoch) only.

        The stock samplers draw from the global generator (length grouping) or count
        epochs themselves (accelerate's seeded sampler), and once a run resumes mid-epoch
        on several processes the wrapped data loader never tells them the epoch: the
        resumed epoch would be shuffled differently than in an uninterrupted run. Here
        the epoch is read from the Trainer's state when iteration starts. Length groups
        are sized by the global batch (the stock sampler uses the per-process one), so
        1 process x 8 trains on what 2 x 4 train on."""

        def __init__(self, lengths: list[int], *, group_size: int | None, seed: int, trainer):
            self.lengths = lengths
            self.group_size = group_size
            self.seed = seed
            self.trainer = trainer  # its state is replaced when training starts or resumes

        def __len__(self) -> int:
            return len(self.lengths)

        def __iter__(self):
            epoch = math.floor((self.trainer.state.epoch or 0.0) + 1e-6)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            if self.group_size:
                yield from get_length_grouped_indices(
                    self.lengths, self.group_size, generator=generator
                )
            else:
                yield from torch.randperm(len(self.lengths), generator=generator).tolist()

    return EpochSeededSampler


def _trainer_class():
    import torch
    from trl import SFTTrainer

    EpochSeededSampler = _epoch_seeded_sampler_class()

    class Trainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            args = self.args
            grouped = args.train_sampling_strategy == "group_by_length"
            return EpochSeededSampler(
                [len(ids) for ids in dataset["input_ids"]],
                group_size=args.train_batch_size
                * args.gradient_accumulation_steps
                * args.world_size
                if grouped
                else None,
                seed=args.data_seed if args.data_seed is not None else args.seed,
                trainer=self,
            )

        def evaluate(self, *args, **kwargs):
            # Evaluation draws from the global RNG (its data loader's seed). Keeping that
            # draw out of the training stream makes a run resumed from any checkpoint
            # repeat an uninterrupted one exactly, evaluations or not.
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                return super().evaluate(*args, **kwargs)

    return Trainer


def build_trainer(
    model,
    tokenizer,
    args,
    *,
    train: Sequence[Example],
    evaluation: Sequence[Example],
    callbacks: Sequence,
    keep_fp32_adapters: bool,
):
    from transformers.trainer_callback import PrinterCallback

    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=to_dataset(train),
        eval_dataset=to_dataset(evaluation) if evaluation else None,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # progress goes to the report and our log lines
    if keep_fp32_adapters:
        # TRL casts a quantised model's adapters to bf16 (the QLoRA paper's choice under
        # bf16 training); in fp32 or fp16 training they stay fp32 masters.
        upcast_trainable(trainer.model)
    return trainer

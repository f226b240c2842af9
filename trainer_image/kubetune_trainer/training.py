"""The training loop: token-normalised gradient accumulation, evaluation, checkpoints.

The loss of an optimizer step is the sum of the token losses of all its
micro-batches divided by the number of label tokens across all of them, so
accumulating k micro-batches gives the same gradient as one batch k times as
large, however unevenly the tokens are spread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kubetune.api.finetuningjob import ResolvedHyperparameters
from kubetune_trainer.batching import Batch, batch_order, collate_packed, collate_padded
from kubetune_trainer.checkpoints import (
    LoopState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from kubetune_trainer.encoding import IGNORE_INDEX, Example
from kubetune_trainer.errors import Interrupted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    """What the loop tells its observers after each optimizer step."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: int
    eval_loss: float | None


StepCallback = Callable[[StepReport], None]


def token_loss_sum(model, batch: Batch, device, virtual_tokens: int = 0) -> torch.Tensor:
    """Sum of the cross-entropy over the batch's label tokens."""
    outputs = model(**batch.model_inputs(device), use_cache=False)
    logits = outputs.logits
    if virtual_tokens:
        logits = logits[:, virtual_tokens:]  # prompt tuning puts its tokens first
    labels = batch.labels.to(device)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


class Trainer:
    def __init__(
        self,
        *,
        model,
        train_examples: Sequence[Example],
        eval_examples: Sequence[Example],
        hyperparameters: ResolvedHyperparameters,
        packed: bool,
        pad_token_id: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        checkpoint_dir: Path,
        virtual_tokens: int = 0,
        callbacks: Sequence[StepCallback] = (),
    ) -> None:
        self.model = model
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples)
        self.hp = hyperparameters
        self.packed = packed
        self.pad_token_id = pad_token_id
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.checkpoint_dir = checkpoint_dir
        self.virtual_tokens = virtual_tokens
        self.callbacks = list(callbacks)
        self.stop_requested = False
        self._batches: list[list[int]] = []
        self._batches_epoch: int | None = None

        self.microbatches_per_epoch = math.ceil(len(self.train_examples) / self.hp.batch_size)
        self.steps_per_epoch = math.ceil(
            self.microbatches_per_epoch / self.hp.gradient_accumulation_steps
        )
        self.total_steps = self.hp.max_steps or self.hp.epochs * self.steps_per_epoch
        self.optimizer = self._optimizer()
        self.scheduler = self._scheduler()
        self.scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
        self.state = LoopState()

    # --- setup -------------------------------------------------------------

    def _optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for _name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        if not decay and not no_decay:
            raise RuntimeError("the model has no trainable parameters")
        groups = [
            {"params": decay, "weight_decay": self.hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.hp.learning_rate)

    def _scheduler(self):
        from transformers import get_scheduler

        return get_scheduler(
            self.hp.lr_scheduler.value,
            self.optimizer,
            num_warmup_steps=math.ceil(self.hp.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint, if there is one."""
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return False
        self.state = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        log.info("resumed from %s (step %d)", path, self.state.step)
        return True

    # --- batches -----------------------------------------------------------

    def collate(self, examples: Sequence[Example]) -> Batch:
        if self.packed:
            return collate_packed(examples)
        return collate_padded(examples, self.pad_token_id)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batch order: a function of (seed, epoch) only, so a resumed run
        continues with exactly the batches an uninterrupted one would have seen."""
        if self._batches_epoch != epoch:
            lengths = [len(e) for e in self.train_examples]
            self._batches = batch_order(lengths, self.hp.batch_size, self.hp.seed, epoch)
            self._batches_epoch = epoch
        return self._batches

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # --- the loop ----------------------------------------------------------

    def fit(self) -> LoopState:
        """Train until total_steps; on SIGTERM save a checkpoint and raise Interrupted."""
        if threading.current_thread() is not threading.main_thread():
            self._fit()  # signal handlers can only be set from the main thread
            return self.state
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._fit()
        finally:
            signal.signal(signal.SIGTERM, previous)
        return self.state

    def _on_sigterm(self, _signum, _frame) -> None:
        log.warning("SIGTERM: saving a checkpoint after the current step")
        self.stop_requested = True

    def _fit(self) -> None:
        self.model.train()
        started = time.monotonic()
        start_step, start_tokens = self.state.step, self.state.real_tokens
        accumulation = self.hp.gradient_accumulation_steps
        if self.state.step == 0 and not self.state.eval_history and self.eval_examples:
            self.state.eval_history.append((0, self.evaluate()))  # the baseline to beat
        while self.state.step < self.total_steps:
            batches = self.epoch_batches(self.state.epoch)
            if self.state.batch_in_epoch >= len(batches):
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                if self.hp.eval_steps is None and self.eval_examples:
                    self.state.eval_history.append((self.state.step, self.evaluate()))
                continue
            window = batches[self.state.batch_in_epoch : self.state.batch_in_epoch + accumulation]
            microbatches = [self.collate([self.train_examples[i] for i in ids]) for ids in window]
            loss = self.optimizer_step(microbatches)
            self.state.batch_in_epoch += len(window)
            self.state.step += 1
            self.state.real_tokens += sum(b.real_tokens for b in microbatches)
            self.state.loss_history.append((self.state.step, loss))
            eval_loss = None
            if (
                self.hp.eval_steps
                and self.eval_examples
                and self.state.step % self.hp.eval_steps == 0
            ):
                eval_loss = self.evaluate()
                self.state.eval_history.append((self.state.step, eval_loss))
            self._notify(started, start_step, start_tokens, loss, eval_loss)
            finished = self.state.step >= self.total_steps
            if self.state.step % self.hp.save_steps == 0 or self.stop_requested:
                save_checkpoint(
                    self.checkpoint_dir, self.model, self.optimizer, self.scheduler, self.state
                )
            if self.stop_requested and not finished:
                raise Interrupted(self.state.step)

    def optimizer_step(self, microbatches: Sequence[Batch]) -> float:
        """One optimizer step over the micro-batches; returns its token-mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.accumulate_gradients(microbatches)
        if self.hp.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.hp.max_grad_norm
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss

    def accumulate_gradients(self, microbatches: Sequence[Batch]) -> float:
        """Backward over each micro-batch, every one scaled by the label tokens of all of
        them; the gradients are those of the token-mean loss of the whole window."""
        total_label_tokens = sum(b.label_tokens for b in microbatches)
        loss_sum = 0.0
        for batch in microbatches:
            if batch.label_tokens == 0:
                continue
            with self.autocast():
                summed = token_loss_sum(self.model, batch, self.device, self.virtual_tokens)
            self.scaler.scale(summed / total_label_tokens).backward()
            loss_sum += summed.item()
        return loss_sum / max(total_label_tokens, 1)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-mean loss over the evaluation split."""
        was_training = self.model.training
        self.model.eval()
        loss_sum, tokens = 0.0, 0
        order = sorted(range(len(self.eval_examples)), key=lambda i: len(self.eval_examples[i]))
        for start in range(0, len(order), self.hp.batch_size):
            batch = self.collate(
                [self.eval_examples[i] for i in order[start : start + self.hp.batch_size]]
            )
            if batch.label_tokens == 0:
                continue
            with self.autocast():
                loss_sum += token_loss_sum(
                    self.model, batch, self.device, self.virtual_tokens
                ).item()
            tokens += batch.label_tokens
        self.model.train(was_training)
        return loss_sum / max(tokens, 1)

    def _notify(self, started, start_step, start_tokens, loss, eval_loss) -> None:
        elapsed = max(time.monotonic() - started, 1e-9)
        steps_done = self.state.step - start_step
        eta = (self.total_steps - self.state.step) * elapsed / max(steps_done, 1)
        latest_eval = self.state.eval_history[-1][1] if self.state.eval_history else None
        report = StepReport(
            step=self.state.step,
            total_steps=self.total_steps,
            epoch=self.state.step / max(self.steps_per_epoch, 1),
            loss=loss,
            learning_rate=self.scheduler.get_last_lr()[0],
            tokens_per_second=(self.state.real_tokens - start_tokens) / elapsed,
            eta_seconds=int(eta),
            eval_loss=eval_loss if eval_loss is not None else latest_eval,
        )
        for callback in self.callbacks:
            callback(report)

"""Trainer callbacks: progress for the operator, a clean stop on SIGTERM, and the
marker that makes a checkpoint resumable."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from kubetune.api.trainer import JobIdentity
from kubetune_trainer.checkpoints import write_marker
from kubetune_trainer.distributed import Processes, any_process, barrier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    """What observers learn after each optimizer step (on the main process)."""

    step: int
    total_steps: int
    epoch: float
    loss: float | None
    learning_rate: float | None
    tokens_per_second: float | None
    eta_seconds: int
    eval_loss: float | None


StepObserver = Callable[[StepReport], None]


@dataclass
class RunClock:
    """Time spent in optimizer steps in this run, apart from evaluation and saving,
    and the real tokens TRL counted in them."""

    step_seconds: float = 0.0
    steps: int = 0
    tokens: float = 0.0
    _began: float | None = None

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.step_seconds if self.step_seconds > 0 and self.tokens else None


class Progress(TrainerCallback):
    """Times the steps, keeps the losses, and tells the observers after each step.

    The loss is what the Trainer logs every loggingSteps (its mean over those steps);
    the last step is always logged, so the run's mean loss can be taken exactly."""

    def __init__(self, observers: Sequence[StepObserver], processes: Processes) -> None:
        self.observers = list(observers)
        self.processes = processes
        self.clock = RunClock()
        self._last_loss: float | None = None
        self._last_lr: float | None = None
        self._last_eval: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock._began = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.clock._began is not None:
            self.clock.step_seconds += time.monotonic() - self.clock._began
            self.clock.steps += 1
            self.clock._began = None
        if state.global_step >= state.max_steps:
            control.should_log = True  # the mean training loss needs the last interval too
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self._last_loss = float(logs["loss"])
        if "learning_rate" in logs:
            self._last_lr = float(logs["learning_rate"])
        if "num_tokens" in logs:
            self.clock.tokens = float(logs["num_tokens"])
        if "eval_loss" in logs:
            self._last_eval = float(logs["eval_loss"])
        if "loss" in logs and self.processes.is_main:
            self._notify(state)

    def _notify(self, state) -> None:
        done = max(self.clock.steps, 1)
        eta = (state.max_steps - state.global_step) * self.clock.step_seconds / done
        report = StepReport(
            step=state.global_step,
            total_steps=state.max_steps,
            epoch=float(state.epoch or 0.0),
            loss=self._last_loss,
            learning_rate=self._last_lr,
            tokens_per_second=self.clock.tokens_per_second,
            eta_seconds=int(eta),
            eval_loss=self._last_eval,
        )
        for observer in self.observers:
            observer(report)


class StopOnSignal(TrainerCallback):
    """SIGTERM (pod deletion, preemption, suspend): finish the current step, save a
    checkpoint, stop. Every process agrees on the step, so none is left waiting."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.requested = False
        self.stopped = False
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_signal(self, _signum, _frame) -> None:
        log.warning("SIGTERM: saving a checkpoint after the current step")
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if any_process(self.requested, self.processes) and state.global_step < state.max_steps:
            self.stopped = True
            control.should_log = True  # the losses since the last log go into the checkpoint
            control.should_save = True
            control.should_training_stop = True
        return control


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once every process has written its part."""

    def __init__(self, job: JobIdentity, processes: Processes) -> None:
        self.job = job
        self.processes = processes

    def on_save(self, args, state, control, **kwargs):
        barrier(self.processes)
        if self.processes.is_main:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_marker(folder, self.job, state.global_step)
        return control

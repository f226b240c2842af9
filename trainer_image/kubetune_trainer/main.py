"""Command line: run the recipe, turn failures into exit codes and a termination message."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from kubetune.api.trainer import ErrorReport, TrainerMode, TrainerTermination
from kubetune_trainer.config import load_config
from kubetune_trainer.errors import EXIT_TRAINER_ERROR, Interrupted, TrainerFailure
from kubetune_trainer.reporting import TERMINATION_PATH_ENV, write_termination

log = logging.getLogger("kubetune_trainer")

EXIT_INTERRUPTED = 143  # 128 + SIGTERM, after a checkpoint was saved


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubetune_trainer", description=__doc__)
    parser.add_argument(
        "--config",
        required=True,
        help="TrainerConfig (--mode merge: MergeConfig) file, JSON or YAML.",
    )
    parser.add_argument(
        "--mode", choices=[m.value for m in TrainerMode], default=TrainerMode.TRAIN.value
    )
    parser.add_argument(
        "--termination-log",
        default=None,
        help=f"Where to write the termination message (default: ${TERMINATION_PATH_ENV} "
        "or /dev/termination-log).",
    )
    return parser.parse_args(argv)


def configure_logging() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("KUBETUNE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None, callbacks=()) -> int:
    args = parse_args(argv)
    configure_logging()
    if args.termination_log:
        os.environ[TERMINATION_PATH_ENV] = args.termination_log
    termination_path = Path(args.termination_log) if args.termination_log else None
    # Heavy imports after argument parsing; a merge pod needs none of the training stack.
    if args.mode == TrainerMode.MERGE:
        from kubetune_trainer import merging
    else:
        from kubetune_trainer import recipe

    try:
        if args.mode == TrainerMode.MERGE:
            termination = merging.run(merging.load_config(args.config))
        else:
            config = load_config(args.config)
            termination = recipe.run(config, TrainerMode(args.mode), callbacks=callbacks)
    except TrainerFailure as failure:
        log.debug("failure", exc_info=True)
        log.error("%s: %s", failure.reason, failure.message)
        error = ErrorReport(reason=failure.reason, message=failure.message)
        write_termination(TrainerTermination(error=error), termination_path)
        return failure.exit_code
    except Interrupted as interrupted:
        log.warning("stopped at step %d after SIGTERM; the next run resumes", interrupted.step)
        return EXIT_INTERRUPTED
    except Exception as err:
        traceback.print_exc(file=sys.stderr)
        summary = f"{type(err).__name__}: {err}".splitlines()[0][:1000]
        error = ErrorReport(reason="TrainerError", message=summary)
        write_termination(TrainerTermination(error=error), termination_path)
        return EXIT_TRAINER_ERROR
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the main process speaks for all
        write_termination(termination, termination_path)
    return 0

"""``hsc-pyg train`` (``python train.py`` in a checkout): train HSC or SGRAF on a SCAN precomp dataset.

    hsc-pyg train --data_path DIR --data_name f30k_precomp --num_epochs 50 --lr_update 20
    hsc-pyg train --config configs/demo.json --data_path data --data_name synthetic_precomp
    hsc-pyg train --resume runs/run/checkpoint/checkpoint.pth
    torchrun --nproc_per_node 4 -m hsc_pyg train --data_path DIR --data_name coco_precomp [--gather_negatives]

The loop is :func:`hsc_pyg.engine.train.train`; this module parses flags, prints and exits (status 2 with a one-line
message on an expected error; after Ctrl-C, SIGTERM or SIGUSR1, which save a resumable checkpoint first, 128 + the
signal's number: 130, 143, 138). Under torchrun it joins the job (one process per GPU; --batch_size captions per
process and step) and only rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Sequence

from ..config import PART_OF, add_config_arguments, config_from_args
from ..errors import ConfigError
from ..options import integer
from .common import OneLineParser, command_parser, exit_with, run_command

DESCRIPTION = """\
Train HSC (ICMR 2022) or SGRAF (AAAI 2021) for image-text retrieval. Flags keep the names and defaults of the original
SGRAF/HSC train.py (batch 128, Adam lr 2e-4 x0.1 every --lr_update epochs, gradient clip 2.0, margin 0.2, hardest
negatives). Validation (first 1,000 dev images / 5,000 captions) runs every --val_step iterations and at each epoch end;
--model_name receives checkpoint.pth (last), model_best.pth (best dev rsum), config.json and vocab.json; --logger_name
receives TensorBoard scalars. Ctrl-C saves a resumable checkpoint.pth; --resume continues exactly."""


def build_parser() -> OneLineParser:
    parser = command_parser("train", DESCRIPTION)
    run = parser.add_argument_group("run")
    run.add_argument("--config", default="", metavar="FILE",
                     help="a JSON config (a config.json written by training, or configs/demo.json); flags override it")
    run.add_argument("--resume", default="", metavar="PATH",
                     help="continue a run exactly from its checkpoint.pth (its config is used; flags override all but "
                          "the model config, which the weights fix)")
    run.add_argument("--max_iters", type=integer(0), default=0, metavar="N",
                     help="stop after N iterations in total, saving a resumable checkpoint (default: 0 = no limit)")
    run.add_argument("--dry_run", action="store_true", help="build everything, run one batch, print its loss, write nothing")
    run.add_argument("--overwrite", action="store_true",
                     help="let --model_name hold another run's checkpoints (they are replaced)")
    run.add_argument("--other_data", action="store_true",
                     help="with --resume: continue although the train or dev data differ from the ones the checkpoint "
                          "was trained on (its best model then compares rsums of two dev sets)")
    run.add_argument("--gather_negatives", action="store_true",
                     help="under torchrun: take the hardest negatives of the loss from every process's batch (the "
                          "global batch) instead of each process's own; each process then scores all the images of "
                          "the global batch against its captions")
    run.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_config_arguments(parser.add_argument_group("options (defaults: the papers')"))
    return parser


def make_config(args: argparse.Namespace):
    """The run's Config and, when resuming, the checkpoint dict."""
    if not args.resume:
        return config_from_args(args), None
    from ..engine.checkpoint import read_checkpoint
    from ..engine.train import resume_config

    if args.config:
        raise ConfigError("--config and --resume exclude each other: a resumed run uses its checkpoint's config")
    checkpoint = read_checkpoint(args.resume)
    given = {name: getattr(args, name) for name in PART_OF if hasattr(args, name)}
    return resume_config(checkpoint, given, source=args.resume), checkpoint


def _log(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def train_command(args: argparse.Namespace) -> int:
    from ..engine.distributed import is_main, torchrun_job
    from ..engine.train import Interrupted, train

    config, checkpoint = make_config(args)
    try:
        with torchrun_job(config.device):
            result = train(config, resume=checkpoint, dry_run=args.dry_run, overwrite=args.overwrite,
                           max_iters=args.max_iters or None, log=_log, progress=not args.no_progress,
                           gather_negatives=args.gather_negatives, other_data=args.other_data)
            main_rank = is_main()
    except Interrupted as e:
        by = "" if e.signum == signal.SIGINT else f" by {signal.Signals(e.signum).name}"
        print(f"interrupted{by} at iteration {e.iteration}: saved {e.path}; continue with --resume {e.path}",
              file=sys.stderr)
        return 128 + e.signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM, 138 for SIGUSR1
    if not args.dry_run and main_rank:
        best = f"{result.best_rsum:.1f}" if result.best_rsum > float("-inf") else "none (no validation yet)"
        print(f"done: epoch {result.epoch}, iteration {result.iteration}, best dev rsum {best}"
              + (f", {result.skipped} batches skipped (non-finite loss)" if result.skipped else "")
              + (f", {result.train_seconds:,.0f} s of training" if result.train_seconds is not None else "")
              + f"; checkpoints in {config.model_name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), train_command, argv,
                       interrupted="interrupted before training started; nothing was saved")


if __name__ == "__main__":
    exit_with(main)

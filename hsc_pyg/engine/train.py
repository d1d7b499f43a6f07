"""The training loop (MODEL.md §2), top to bottom: config, data, model, optimizer, loop, validation, checkpoints.

``train(config)`` runs it (``hsc-pyg train`` is the command line over it): :func:`start` sets a :class:`Run` up (data,
model, optimizer, a resumed run's state), :func:`loop` runs :func:`train_one_epoch` until the last epoch, which runs
:func:`step` per batch and :func:`validate` / :func:`record` / :func:`save` when due. Each feature is a small named
step:

- **Data order** is drawn from one ``torch.Generator`` (the sampler's), one permutation per epoch, cut into
  ``batch_size`` batches (the last partial batch is dropped). The checkpoint saves the generator's state at the start
  of the epoch and the number of items (captions) already taken, so a resumed run sees exactly the batches it has not
  seen.
- **Checkpoints**: at every validation (every ``val_step`` iterations and at each epoch end) ``model_best.pth`` when the
  dev rsum improved (weights, config, vocabulary and counters: not resumable, so that a resume cannot rewind the run),
  then ``checkpoint.pth`` (last, recording that best) with also the optimizer / scheduler / grad-scaler state and every
  RNG state (torch, CUDA, numpy, python, sampler), both written atomically and both carrying the data fingerprint of the
  train and dev splits (a resume on other data is refused). A kill between the two leaves a checkpoint that does not yet
  know the new best: resuming repeats that validation and writes the same best model again. A checkpoint alone is enough
  to evaluate (``evaluate.py``) or to continue exactly (``--resume``); validation runs on its own RNG state (saved and
  restored around it), so it never changes the training's random draws, and a checkpoint saved before a due validation
  ran makes the resumed run validate first.
- **One run per folder**: the folder's lock (:class:`hsc_pyg.io.FolderLock`, naming its holder) keeps a second run (or
  any other command) out; checkpoints carry a ``run_id``, and a run resumed into a folder that holds another run's
  checkpoints needs ``overwrite``.
- **Ctrl-C, SIGTERM, SIGUSR1** are deferred while a step or a save is in progress, then save a resumable
  ``checkpoint.pth`` (a second signal during that save waits for it) and raise :class:`Interrupted`.
- **NaN / inf loss**: ``nan_policy="stop"`` raises :class:`~hsc_pyg.errors.TrainingError` without saving (the last
  good checkpoint stays); ``"skip"`` drops the batch's update and counts it.
- **Warm-up**: the sum of violations for the first ``max_violation_after`` epochs, then the hardest negative.
- **Several processes** (``torchrun``; the command line joins the job, see :mod:`hsc_pyg.engine.distributed`): the
  model runs in ``DistributedDataParallel``; each process takes ``batch_size`` captions per step, the ranks' batches
  being consecutive slices of the epoch's one permutation (so the checkpoint counts the epoch's items taken, and a
  run resumes with any number of processes). The negatives of the hinge loss are each rank's own batch (the original
  loss per process, gradients averaged) or, with ``gather_negatives``, the global batch
  (:class:`~hsc_pyg.engine.distributed.GatheredNegatives`). Rank 0 alone writes checkpoints, TensorBoard and the
  log, and its BatchNorm running statistics are the ones kept (DDP broadcasts them at every forward; they are
  broadcast again before each validation, which splits the score matrix across the ranks).
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Config, model_differences
from ..data.precomp import CaptionDataset, PrecompSplit
from ..data.vocab import Vocabulary, build_vocab
from ..data.word_vectors import init_word_embedding, load_word_vectors
from ..errors import CheckpointError, ConfigError, DataError, TrainingError, os_error_reason
from ..io import FolderLock, remove_stale_temps
from ..nn.loss import ContrastiveLoss, ImageTextContrastive
from ..nn.model import HSCModel, build_model
from . import distributed
from .blocking import BatchScores
from .checkpoint import check_same_data, data_fingerprint, read_checkpoint, run_config_of, save_checkpoint
from .device import autocast, resolve_device
from .scoring import evaluate
from .metrics import RECALL_KEYS

CHECKPOINT = "checkpoint.pth"
BEST = "model_best.pth"
#: The signals that stop a run with a resumable checkpoint: Ctrl-C, what schedulers send before a kill (SIGTERM), and
#: Slurm's pre-emption warning (SIGUSR1). The command line exits with 128 + the signal's number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

Log = Callable[[str], None]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or the signal ``signum`` of :data:`STOP_SIGNALS`) during training, after a resumable checkpoint was
    saved at ``path``."""

    def __init__(self, path: Path, iteration: int, signum: int = signal.SIGINT) -> None:
        super().__init__(f"interrupted at iteration {iteration}; saved {path}")
        self.path, self.iteration, self.signum = path, iteration, signum


@dataclass
class TrainResult:
    """What a call of :func:`train` did: ``losses`` holds ``(iteration, loss)`` of every step it ran (NaN for a
    skipped batch); ``metrics`` is the last validation's."""

    iteration: int
    epoch: int
    best_rsum: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    skipped: int = 0
    model: HSCModel | None = None
    train_seconds: float | None = None             # the run's, every attempt counted (see Run)


# --------------------------------------------------------------------------- resume checks
def check_resumable(checkpoint: dict[str, Any], source: str) -> None:
    """CheckpointError unless ``checkpoint`` holds the training state (a model_best.pth or a converted official
    checkpoint holds weights only)."""
    if "optimizer" not in checkpoint or "sampler" not in checkpoint:
        raise CheckpointError(f"{source} holds weights but no training state, so it cannot be resumed; resume from "
                              "the run's checkpoint.pth, or evaluate this one with evaluate.py")
    problem = training_state_problem(checkpoint)
    if problem:
        raise CheckpointError(f"{source}: its training state is damaged ({problem}), so it cannot be resumed "
                              "exactly; resume from another checkpoint.pth or start a new run")


def training_state_problem(checkpoint: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's training state (optimizer, scheduler, sampler, RNG, counters), or None."""
    counters = {k: checkpoint.get(k) for k in ("epoch", "iteration")}
    bad = next((k for k, v in counters.items() if type(v) is not int or v < 0), None)
    if bad:
        return f"{bad} is {counters[bad]!r}, not a count"
    if not isinstance(checkpoint.get("best_rsum"), (int, float)):
        return f"best_rsum is {checkpoint.get('best_rsum')!r}, not a number"
    optimizer = checkpoint["optimizer"]
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list) or not optimizer["param_groups"]:
        return "the optimizer state has no parameter groups"
    if checkpoint["iteration"] > 0 and not optimizer["state"]:
        return f"the optimizer state is empty after {checkpoint['iteration']} iterations"
    scheduler = checkpoint.get("scheduler")
    if not isinstance(scheduler, dict):
        return "no learning-rate schedule state"
    groups = len(optimizer["param_groups"])
    if type(scheduler.get("last_epoch")) is not int or scheduler["last_epoch"] < 0 \
            or not isinstance(scheduler.get("base_lrs"), list) or len(scheduler["base_lrs"]) != groups \
            or not all(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0 for lr in scheduler["base_lrs"]):
        return "the learning-rate schedule state is damaged (last_epoch, base_lrs)"
    sampler = checkpoint["sampler"]
    if not isinstance(sampler, dict) or not isinstance(sampler.get("epoch_start"), torch.Tensor) \
            or sampler["epoch_start"].dtype != torch.uint8 or type(sampler.get("position")) is not int \
            or sampler["position"] < 0:
        return "no data-order position (sampler epoch_start and position)"
    rng = checkpoint.get("rng")
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) \
            or not isinstance(rng.get("numpy"), list) or len(rng["numpy"]) != 5 \
            or not isinstance(rng.get("python"), list) or len(rng["python"]) != 3:
        return "no RNG state (torch, numpy, python)"
    return None


def resume_config(checkpoint: dict[str, Any], overrides: dict[str, Any], source: str) -> Config:
    """The config of a resumed run: the checkpoint's, with the options given on the command line; ConfigError for any
    change to its ModelConfig (the saved weights fix it) or its vocabulary options."""
    check_resumable(checkpoint, source)
    base = run_config_of(checkpoint, source)
    config = base.replace(**overrides)
    changed = model_differences(base.model, config.model)
    for name in ("vocab_path", "vocab_threshold"):   # the checkpoint's vocabulary is the run's
        if checkpoint.get("vocab") is not None and getattr(config, name) != getattr(base, name):
            changed.append(name)
    if changed:
        raise ConfigError(f"--{changed[0]} cannot change when resuming {source} (it was {getattr(base, changed[0])!r}); "
                          "start a new run with --model_name NEW_FOLDER instead")
    return config


# --------------------------------------------------------------------------- seeds and RNG state
def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """Every global RNG state, in types that ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


# --------------------------------------------------------------------------- data
@dataclass
class SamplerState:
    """Where the data order stands: the sampler generator's state when the current epoch's permutation was drawn,
    and how many items (captions) of that epoch have been taken, by all processes together."""

    epoch_start: torch.Tensor
    position: int = 0


def open_data(config: Config, vocab: Vocabulary | None) -> tuple[PrecompSplit, PrecompSplit, Vocabulary]:
    """The train and dev splits and the vocabulary (given, from ``--vocab_path``, or built from train)."""
    train_split = PrecompSplit.open(config.data_path, config.data_name, "train")
    dev_split = PrecompSplit.open(config.data_path, config.data_name, "dev")
    if (dev_split.img_dim, dev_split.num_regions) != (train_split.img_dim, train_split.num_regions):
        raise DataError(f"{dev_split.file('ims.npy')} has {dev_split.num_regions} x {dev_split.img_dim} features per "
                        f"image but train has {train_split.num_regions} x {train_split.img_dim}; the splits must "
                        "come from the same feature extractor")
    if vocab is None:
        vocab = (Vocabulary.load(config.vocab_path) if config.vocab_path
                 else build_vocab(train_split.captions, threshold=config.vocab_threshold))
    if config.batch_size > train_split.num_captions:
        raise ConfigError(f"--batch_size {config.batch_size} is larger than the {train_split.num_captions} captions "
                          f"of {train_split.file('caps.txt')}; use at most {train_split.num_captions}")
    return train_split, dev_split, vocab


def _probe(target: Path, what: str, flag: str) -> None:
    """ConfigError when ``target`` cannot be created or written."""
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write {what} into {target} ({os_error_reason(e)}); choose a writable {flag}") from None


def _run_id(path: Path) -> str | None:
    """The ``run_id`` of a checkpoint file ("unreadable" when it cannot be read)."""
    try:
        return read_checkpoint(path).get("run_id")
    except CheckpointError:
        return "unreadable"


def prepare_output(folder: Path, overwrite: bool, run_id: str | None, resuming: bool,
                   log_folder: Path | None = None) -> tuple[FolderLock, list[Path]]:
    """Lock ``folder`` for this run and return the lock and the checkpoints of other runs there (to be removed once
    the inputs have been checked). ConfigError when another process holds the lock, when the folder holds another
    run's checkpoints and not ``overwrite`` (a resumed run's own checkpoints, same ``run_id``, are not another run's),
    or when it or the TensorBoard folder ``log_folder`` cannot be written."""
    _probe(folder, "checkpoints", "--model_name")
    lock = FolderLock.acquire(folder, "--model_name")
    try:
        existing = [folder / name for name in (BEST, CHECKPOINT) if (folder / name).exists()]
        foreign = [p for p in existing if not resuming or _run_id(p) != run_id]
        if foreign and not overwrite:
            names = " and ".join(p.name for p in foreign)
            if resuming:
                raise ConfigError(f"{folder} already holds {names} of another run than the one resumed; pass "
                                  "--overwrite to replace them, or choose another --model_name")
            raise ConfigError(f"{folder} already holds {names} of another run; pass --resume {folder / CHECKPOINT} "
                              "to continue it, --overwrite to replace it, or another --model_name")
        if log_folder is not None:
            _probe(log_folder, "TensorBoard logs", "--logger_name")
        remove_stale_temps(folder)  # of writers killed during a save
    except BaseException:
        lock.release()
        raise
    return lock, foreign


class Scalars:
    """TensorBoard scalars that cannot stop training: the first write error (a full disk) becomes one warning line
    and the scalars stop; the writer thread's traceback of that error is not printed."""

    def __init__(self, logger_name: str, purge_step: int | None, log: Log) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

        self.log, self.writer = log, None
        self.hook = threading.excepthook
        threading.excepthook = self._thread_error
        try:
            self.writer = SummaryWriter(logger_name, purge_step=purge_step)
        except OSError as e:
            self._stopped(e)

    def _thread_error(self, args) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard")):
            self.hook(args)  # the main thread reports this one at the next write

    def _call(self, method: str, *args) -> None:
        if self.writer is None:
            return
        try:
            getattr(self.writer, method)(*args)
        except OSError as e:
            self._stopped(e)

    def _stopped(self, error: OSError) -> None:
        self.writer = None
        self.log(f"warning: TensorBoard logging stopped ({os_error_reason(error)}); training goes on")

    def add(self, tag: str, value: float, step: int) -> None:
        self._call("add_scalar", tag, value, step)

    def close(self) -> None:
        self._call("close")
        threading.excepthook = self.hook


# --------------------------------------------------------------------------- Ctrl-C
class DeferredInterrupt:
    """A stop signal (:data:`STOP_SIGNALS`) raises ``KeyboardInterrupt`` at once, except inside :meth:`critical` (a
    training step, a save), where it is held until the block ends, so that the state saved on interrupt is always that
    of a step boundary. ``signum`` is the first signal received; inside :meth:`hold` (the interrupt's own save) further
    signals are only counted, never raised."""

    def __init__(self) -> None:
        self.depth, self.pending, self.previous, self.signum = 0, False, {}, None

    def _handler(self, signum, frame) -> None:
        self.signum = self.signum or signum
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator["DeferredInterrupt"]:
        """Install the handlers; they are put back at the end of the block only when it ends normally, so that the
        interrupt's own save (in the caller's ``except``) is still protected: the caller calls :meth:`uninstall` in
        its ``finally``."""
        if threading.current_thread() is threading.main_thread() and not self.previous:
            self.previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        yield self  # elsewhere signals reach the main thread only: nothing to defer
        self.uninstall()

    def uninstall(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending:
            self.pending = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Defer every signal for the block and drop them at its end (the caller is stopping anyway)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            self.pending = False


# --------------------------------------------------------------------------- one step
def train_step(model: torch.nn.Module, pairs, criterion: ContrastiveLoss, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, config: Config, device: torch.device, hardest: bool,
               itc: ImageTextContrastive | None = None) -> tuple[float, torch.Tensor]:
    """Forward, loss, backward, clip, update. Returns the loss and the ``[B, B]`` scores; when the loss or the
    gradient norm is not finite, nothing is updated and the loss returned is NaN or inf (a NaN for a bad gradient).
    The loss is the hinge loss of the exact scores plus ``config.itc_weight`` times the first stage's contrastive
    loss ``itc`` (not computed at all when the weight is 0: the papers' loss exactly).

    ``model`` maps a PairBatch to scores: a :class:`~hsc_pyg.engine.blocking.BatchScores` (or
    :class:`~hsc_pyg.engine.distributed.GatheredNegatives`), or its DistributedDataParallel wrapper; with several
    processes the loss returned is the mean over the ranks, so that all of them skip a non-finite step together."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, config.amp):
        out = model(pairs)
    scores = out.scores
    loss = criterion(scores.float(), max_violation=hardest)
    if config.itc_weight:
        loss = loss + config.itc_weight * itc(out.cosine.float(), out.scale.float(), max_violation=hardest,
                                              scores=scores.float() if itc.needs_scores else None)
    loss_value = distributed.mean_over_ranks(loss.item())
    if not math.isfinite(loss_value):
        return loss_value, scores
    scaler.scale(loss).backward()
    if config.grad_clip > 0:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if not scaler.is_enabled() and not torch.isfinite(norm):  # fp16: the scaler skips such steps itself
            optimizer.zero_grad(set_to_none=True)
            return math.nan, scores
    scaler.step(optimizer)
    scaler.update()
    return loss_value, scores


# --------------------------------------------------------------------------- the loop
def format_metrics(metrics: dict[str, Any]) -> str:
    i2t = " / ".join(f"{metrics[k]:.1f}" for k in RECALL_KEYS[:3])
    t2i = " / ".join(f"{metrics[k]:.1f}" for k in RECALL_KEYS[3:])
    return f"i2t R@1/5/10 {i2t} | t2i R@1/5/10 {t2i} | rsum {metrics['rsum']:.1f}"


@dataclass
class Run:
    """One training run: what it trains with, and where it stands (the counters a checkpoint saves). Every step of the
    loop below takes it and changes it in the open; nothing else holds training state."""

    config: Config
    model: HSCModel
    net: torch.nn.Module                        # the model's training forward, or its DistributedDataParallel wrapper
    criterion: ContrastiveLoss
    itc: ImageTextContrastive
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    scaler: torch.amp.GradScaler
    dataset: CaptionDataset
    batch_sampler: distributed.DistributedBatchSampler
    sampler_generator: torch.Generator
    sampler: SamplerState
    dev_split: PrecompSplit
    vocab: Vocabulary
    device: torch.device
    out: Path
    run_id: str
    log: Log
    main: bool                                   # rank 0 (or the only process): writes checkpoints and logs
    writer: Scalars | None = None
    epoch: int = 0
    iteration: int = 0
    best_rsum: float = -math.inf
    validated: int = 0                           # the iteration of the last validation recorded
    last_saved: int | None = None                # the iteration of the last checkpoint.pth
    resumed: bool = False
    timer: tuple[float, int] = (0.0, 0)          # (time, iteration) of the last steps-per-second measurement
    # wall time of the run's training so far, validations included, over every attempt (None: resumed from a
    # checkpoint that did not count it), up to ``clock`` (time.perf_counter() when the attempt's loop began)
    train_seconds: float | None = 0.0
    clock: float = 0.0
    data_fingerprint: dict[str, Any] = field(default_factory=dict)   # of the train and dev splits, saved


def train(config: Config, resume: str | Path | dict[str, Any] | None = None, *, dry_run: bool = False,
          overwrite: bool = False, max_iters: int | None = None, log: Log | None = None,
          progress: bool = False, gather_negatives: bool = False, other_data: bool = False) -> TrainResult:
    """Train ``config`` (presets already applied); see the module docstring.

    Args:
        resume: a checkpoint (path or dict from :func:`~hsc_pyg.engine.checkpoint.read_checkpoint`) to continue from;
            ``config`` should then be :func:`resume_config` of it.
        dry_run: build everything, run one training step, write nothing.
        overwrite: allow ``config.model_name`` to hold another run's checkpoints.
        max_iters: stop after this many iterations in total (counting those before a resume), saving a resumable
            checkpoint.
        log: called with one line per validation and per notable event (default: silent).
        progress: show a tqdm bar per epoch.
        gather_negatives: with several processes, the hardest negatives of the loss come from the global batch
            (every rank's captions and images) instead of each rank's own batch.
        other_data: resume although the train or dev data differ from the checkpoint's (its data fingerprint).

    Under torchrun every process calls it (inside :func:`~hsc_pyg.engine.distributed.process_group`, as the command
    line does); each process takes ``config.batch_size`` captions per step.
    """
    locks: list[FolderLock] = []  # the run folder's lock, held until the run ends whichever way
    writes = not dry_run and distributed.is_main()
    new_folders = _missing_folders(Path(config.model_name), Path(config.logger_name)) if writes else []
    try:
        try:
            run = start(config, resume, locks, dry_run=dry_run, overwrite=overwrite, log=log,
                        gather_negatives=gather_negatives, other_data=other_data)
        except BaseException:  # refused before it began: no empty run folders left behind
            for lock in locks:
                lock.release()
            for folder in new_folders:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
            raise
        return loop(run, dry_run=dry_run, max_iters=max_iters, progress=progress)
    finally:
        for lock in locks:
            lock.release()


def _missing_folders(*folders: Path) -> list[Path]:
    """The folders among ``folders`` and their parents that do not exist yet, deepest first."""
    missing = {path for folder in folders for path in (folder, *folder.parents) if not path.exists()}
    return sorted(missing, key=lambda path: len(path.parts), reverse=True)


# --------------------------------------------------------------------------- set up: data, model, resume
def start(config: Config, resume: str | Path | dict[str, Any] | None, locks: list[FolderLock], *, dry_run: bool,
          overwrite: bool, log: Log | None, gather_negatives: bool, other_data: bool = False) -> Run:
    """Check the inputs, lock the output folder, open the data, build the model and its optimizer, restore a resumed
    run's state and write the run's config and vocabulary: a :class:`Run` at its first (or resumed) step."""
    main = distributed.is_main()
    log = log if log is not None and main else (lambda line: None)
    device = distributed.local_device(resolve_device(config.device))
    autocast(device, config.amp)  # fails early on an --amp the device cannot do
    checkpoint = None
    if resume is not None:
        checkpoint = resume if isinstance(resume, dict) else read_checkpoint(resume)
        check_resumable(checkpoint, "the checkpoint" if isinstance(resume, dict) else str(resume))
    run_id = checkpoint.get("run_id") if checkpoint is not None else uuid.uuid4().hex
    out, foreign = Path(config.model_name), []
    if not dry_run and main:
        lock, foreign = prepare_output(out, overwrite, run_id, resuming=checkpoint is not None,
                                       log_folder=Path(config.logger_name))
        locks.append(lock)
    seed_everything(config.seed + distributed.get_rank(), config.deterministic)  # rank 0's weights go to all (DDP)
    config, dataset, dev_split, vocab = open_training_data(config, checkpoint)
    fingerprint = data_fingerprint(dataset.split, dev_split)
    if checkpoint is not None and not other_data:
        check_same_data(checkpoint, fingerprint, "the checkpoint" if isinstance(resume, dict) else str(resume))
    model = build_model(config).to(device)
    model.vocab = vocab
    if checkpoint is None and config.word_vectors:  # a resumed run's embedding comes from its checkpoint
        found = init_word_embedding(model.text_encoder.embed.weight, vocab, load_word_vectors(config.word_vectors))
        log(f"word vectors {config.word_vectors}: {found} of the {len(vocab)} vocabulary words start from their "
            "vector, the others from random values")
    # the first stage learns only with its loss on; otherwise its parameters stay as built (no gradient, no update)
    model.first_stage.requires_grad_(config.itc_weight > 0)
    if config.itc_weight > 0:
        model.first_stage.trained.fill_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    sampler_generator = torch.Generator().manual_seed(config.seed)
    run = Run(config, model, model, ContrastiveLoss(config.margin, config.max_violation),
              ImageTextContrastive(config.itc_loss, config.margin, config.max_violation), optimizer,
              torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_update, gamma=0.1),
              torch.amp.GradScaler(device.type, enabled=config.amp == "fp16"), dataset,
              distributed.DistributedBatchSampler(len(dataset), config.batch_size), sampler_generator,
              SamplerState(sampler_generator.get_state()), dev_split, vocab, device, out, run_id, log, main,
              data_fingerprint=fingerprint)
    if run.batch_sampler.steps_per_epoch() == 0:
        raise ConfigError(f"--batch_size {config.batch_size} x {run.batch_sampler.world} processes is more than the "
                          f"{len(dataset)} captions of {dataset.split.file('caps.txt')}; use a smaller "
                          "--batch_size")
    if checkpoint is not None:
        restore(run, checkpoint)
    else:
        processes = f" x {run.batch_sampler.world} processes" if run.batch_sampler.world > 1 else ""
        log(f"{config.preset}: {model.num_parameters():,} parameters, vocabulary {len(vocab)}, {len(dataset)} train "
            f"captions ({run.batch_sampler.steps_per_epoch()} batches of {config.batch_size}{processes}), "
            f"{dev_split.num_images} dev images, on {device}")
    # the training forward (blocks within --score_chunk_mb); several processes: DDP over it (or over the forward with
    # the global batch's negatives)
    forward = (distributed.GatheredNegatives if gather_negatives else BatchScores)(model, config.score_chunk_mb)
    run.net = distributed.wrap_model(forward, device)
    if not dry_run and main:
        vocab.save(out / "vocab.json")
        config.save(out / "config.json")
        for path in foreign:  # --overwrite: the other run's checkpoints go once the inputs are checked and written
            path.unlink(missing_ok=True)
        run.writer = Scalars(config.logger_name, run.iteration + 1 if run.resumed else None, log)
    return run


def open_training_data(config: Config, checkpoint: dict[str, Any] | None,
                       ) -> tuple[Config, CaptionDataset, PrecompSplit, Vocabulary]:
    """The train captions as a dataset, the dev split and the vocabulary (a resumed run's own); the config completed
    with the data's feature size, region count and vocabulary size."""
    saved_vocab = Vocabulary.from_dict(checkpoint["vocab"]) if checkpoint and checkpoint.get("vocab") else None
    train_split, dev_split, vocab = open_data(config, saved_vocab)
    if checkpoint and (train_split.img_dim, train_split.num_regions) != (config.img_dim, config.num_regions):
        raise DataError(f"{train_split.file('ims.npy')} has {train_split.num_regions} x {train_split.img_dim} "
                        f"features per image but the checkpoint was trained on {config.num_regions} x "
                        f"{config.img_dim}; resume on the dataset it was trained on")
    config = config.replace(img_dim=train_split.img_dim, num_regions=train_split.num_regions, vocab_size=len(vocab))
    config.model.check_boxes(train_split.boxes is not None)
    dataset = CaptionDataset(train_split, vocab, config.img_edges, config.txt_edges, config.caption_word_drop,
                             config.seed)
    return config, dataset, dev_split, vocab


def restore(run: Run, checkpoint: dict[str, Any]) -> None:
    """Continue ``checkpoint``'s run exactly: weights, optimizer, schedule, grad scaler, RNG, data order, counters."""
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.scheduler.step_size = run.config.lr_update  # a --lr_update given on resume applies from here on
    if checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    if run.main:  # the other ranks keep their own dropout streams (seed + rank)
        set_rng_state(checkpoint["rng"])
    run.sampler = SamplerState(checkpoint["sampler"]["epoch_start"], int(checkpoint["sampler"]["position"]))
    run.epoch, run.iteration = int(checkpoint["epoch"]), int(checkpoint["iteration"])
    run.best_rsum = float(checkpoint["best_rsum"])
    seconds = checkpoint.get("train_seconds")
    run.train_seconds = float(seconds) if isinstance(seconds, (int, float)) else None
    run.validated = int(checkpoint.get("validated", run.iteration))
    run.last_saved, run.resumed = run.iteration, True
    world = run.batch_sampler.world
    run.log(f"resumed at epoch {run.epoch}, iteration {run.iteration} (best dev rsum {run.best_rsum:.1f})"
            + (f", on {world} process(es) instead of {checkpoint.get('world_size', 1)}"
               if checkpoint.get("world_size", 1) != world else ""))


# --------------------------------------------------------------------------- save, validate, record
def save(run: Run, path: Path) -> None:
    """Write ``path`` (rank 0 only): checkpoint.pth with everything a resume needs; model_best.pth with the weights,
    configs, vocabulary and counters only, so that ``--resume`` refuses it (it would rewind the run)."""
    if run.main:
        state = dict(optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                     scaler=run.scaler.state_dict(), rng=rng_state(), world_size=run.batch_sampler.world,
                     sampler={"epoch_start": run.sampler.epoch_start, "position": run.sampler.position}
                     ) if path.name == CHECKPOINT else {}
        save_checkpoint(path, run.model, run.config, epoch=run.epoch, iteration=run.iteration,
                        best_rsum=run.best_rsum, run_id=run.run_id, validated=run.validated,
                        data_fingerprint=run.data_fingerprint, train_seconds=train_seconds(run), **state)
    if path.name == CHECKPOINT:
        run.last_saved = run.iteration


def train_seconds(run: Run) -> float | None:
    """The run's training wall time until now, every attempt counted (None when an earlier attempt's is unknown)."""
    return None if run.train_seconds is None else run.train_seconds + time.perf_counter() - run.clock


def validate(run: Run) -> dict[str, Any]:
    """Dev metrics; every RNG is restored afterwards, so the training's random draws do not depend on when (or
    whether, after an interrupt) validations ran."""
    start_time = time.perf_counter()
    distributed.broadcast_buffers(run.model)  # every rank evaluates rank 0's model, the one saved
    training_rng = rng_state()
    try:
        metrics = evaluate(run.model, run.dev_split, run.vocab, max_images=run.config.val_images,
                           batch_size=run.config.batch_size, amp=run.config.amp, chunk_mb=run.config.score_chunk_mb)
    finally:
        set_rng_state(training_rng)
    metrics["seconds"] = time.perf_counter() - start_time
    if run.writer is not None:
        for key in (*RECALL_KEYS, "rsum"):
            run.writer.add(f"val/{key}", metrics[key], run.iteration)
    return metrics


def record(run: Run, metrics: dict[str, Any]) -> None:
    """Save the best model when the dev rsum improved, then the last checkpoint that records it (the caller holds a
    critical section)."""
    improved = metrics["rsum"] > run.best_rsum
    run.best_rsum = max(run.best_rsum, metrics["rsum"])
    run.validated = run.iteration
    if improved:
        save(run, run.out / BEST)
    save(run, run.out / CHECKPOINT)
    epoch = run.epoch if run.sampler.position else run.epoch - 1
    run.log(f"epoch {epoch} iter {run.iteration} dev: {format_metrics(metrics)}"
            f"{' (best)' if improved else f' (best {run.best_rsum:.1f})'} [{metrics['seconds']:.0f} s]")


def validate_and_record(run: Run, result: TrainResult, guard: DeferredInterrupt) -> None:
    result.metrics = validate(run)
    with guard.critical():
        record(run, result.metrics)
    run.timer = (time.perf_counter(), run.iteration)


# --------------------------------------------------------------------------- the loop
def loop(run: Run, *, dry_run: bool, max_iters: int | None, progress: bool) -> TrainResult:
    """Epochs until ``num_epochs`` (or ``max_iters``); Ctrl-C and the other stop signals save a resumable checkpoint
    and raise :class:`Interrupted`."""
    result = TrainResult(run.iteration, run.epoch, run.best_rsum, model=run.model)
    guard = DeferredInterrupt()
    run.model.train()
    run.clock = time.perf_counter()
    run.timer = (run.clock, run.iteration)
    if max_iters is not None and run.iteration >= max_iters:
        run.log(f"nothing to do: the run is at iteration {run.iteration} and --max_iters is {max_iters}")
        if run.writer is not None:
            run.writer.close()
        return result
    try:
        with guard.installed():
            if validation_due(run):  # the run was stopped before (or during) this validation: run it first
                validate_and_record(run, result, guard)
            while run.epoch < run.config.num_epochs:
                if not train_one_epoch(run, result, guard, dry_run=dry_run, max_iters=max_iters, progress=progress):
                    break
    except KeyboardInterrupt:
        if dry_run:
            raise
        with guard.hold():
            save(run, run.out / CHECKPOINT)
        raise Interrupted(run.out / CHECKPOINT, run.iteration, guard.signum or signal.SIGINT) from None
    finally:
        guard.uninstall()
        if run.writer is not None:
            run.writer.close()
    result.iteration, result.epoch, result.best_rsum = run.iteration, run.epoch, run.best_rsum
    result.train_seconds = train_seconds(run)
    return result


def validation_due(run: Run) -> bool:
    """Whether the validation due at this resumed iteration has not been recorded (the one at an epoch's end is run
    by the loop itself)."""
    return (run.resumed and run.validated != run.iteration and run.iteration > 0
            and run.iteration % run.config.val_step == 0
            and run.batch_sampler.steps_per_epoch(run.sampler.position) > 0)


def train_one_epoch(run: Run, result: TrainResult, guard: DeferredInterrupt, *, dry_run: bool,
                    max_iters: int | None, progress: bool) -> bool:
    """The rest of the current epoch, validating every ``val_step`` iterations and at its end; False when the run
    stops here (a dry run's one step, or ``max_iters``)."""
    config, batches = run.config, run.batch_sampler
    run.sampler_generator.set_state(run.sampler.epoch_start)
    batches.set_epoch(run.sampler_generator, start=run.sampler.position)
    run.dataset.set_epoch(run.epoch)
    loader = DataLoader(run.dataset, batch_sampler=batches, collate_fn=run.dataset.collate_fn,
                        num_workers=config.workers, generator=torch.Generator().manual_seed(config.seed),
                        pin_memory=run.device.type == "cuda")
    hardest = config.max_violation and run.epoch >= config.max_violation_after
    bar = tqdm(loader, desc=f"epoch {run.epoch}", initial=batches.steps_per_epoch() - len(batches),
               total=batches.steps_per_epoch(), disable=not progress or dry_run or not run.main, dynamic_ncols=True,
               leave=False)
    for pairs in bar:
        with guard.critical():
            loss_value, scores = step(run, pairs, hardest, result)
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        if dry_run:
            run.log(f"dry run: one batch of {len(pairs)} captions / {pairs.images.num_graphs} images, scores "
                    f"{list(scores.shape)}, loss {loss_value:.4f}; nothing written")
            return False
        if run.writer is not None and run.iteration % config.log_step == 0:
            log_scalars(run, loss_value)
        if run.iteration % config.val_step == 0 and batches.steps_per_epoch(run.sampler.position) > 0:
            validate_and_record(run, result, guard)
        if max_iters is not None and run.iteration >= max_iters:
            break
    bar.close()
    if batches.steps_per_epoch(run.sampler.position) > 0:  # stopped by max_iters
        with guard.critical():
            save(run, run.out / CHECKPOINT)
        run.log(f"stopped at iteration {run.iteration} (--max_iters); resume with --resume {run.out / CHECKPOINT}")
        return False
    result.metrics = validate(run)
    with guard.critical():
        run.scheduler.step()
        run.epoch += 1
        run.sampler.epoch_start, run.sampler.position = run.sampler_generator.get_state(), 0
        record(run, result.metrics)
    run.timer = (time.perf_counter(), run.iteration)
    return max_iters is None or run.iteration < max_iters


def step(run: Run, pairs, hardest: bool, result: TrainResult) -> tuple[float, torch.Tensor]:
    """One training step on ``pairs`` and its bookkeeping (counters, data position, the NaN policy); the loss and the
    batch's scores."""
    pairs = pairs.to(run.device, non_blocking=True)
    loss_value, scores = train_step(run.net, pairs, run.criterion, run.optimizer, run.scaler, run.config, run.device,
                                    hardest, run.itc)
    if not math.isfinite(loss_value):
        if run.config.nan_policy == "stop":
            kept = (f"{run.out / CHECKPOINT} (iteration {run.last_saved}) is the last good checkpoint"
                    if run.last_saved is not None else "no checkpoint of this run was saved")
            raise TrainingError(f"the loss or the gradient became non-finite (loss {loss_value}) at epoch "
                                f"{run.epoch}, iteration {run.iteration + 1}; training stopped and {kept}; lower "
                                "--learning_rate, use --amp off, or pass --nan_policy skip to skip such batches")
        result.skipped += 1
        run.log(f"epoch {run.epoch} iter {run.iteration + 1}: non-finite loss or gradient ({loss_value}), batch "
                f"skipped ({result.skipped} so far)")
    run.iteration += 1
    run.sampler.position += run.batch_sampler.global_batch
    result.losses.append((run.iteration, loss_value))
    return loss_value, scores


def log_scalars(run: Run, loss_value: float) -> None:
    """The training scalars of TensorBoard: loss, learning rate, steps per second since the last measurement."""
    now, (then, then_iteration) = time.perf_counter(), run.timer
    run.writer.add("train/loss", loss_value, run.iteration)
    run.writer.add("train/lr", run.optimizer.param_groups[0]["lr"], run.iteration)
    run.writer.add("train/steps_per_s", (run.iteration - then_iteration) / (now - then), run.iteration)
    run.timer = (now, run.iteration)

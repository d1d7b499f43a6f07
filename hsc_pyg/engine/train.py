"""The training loop (MODEL.md §2), top to bottom: config, data, model, optimizer, loop, validation, checkpoints.

``train(config)`` runs it; ``train.py`` is the command line over it. Each feature is a small named step below:

- **Data order** is drawn from one ``torch.Generator`` (the sampler's), one permutation per epoch, cut into
  ``batch_size`` batches (the last partial batch is dropped). The checkpoint saves the generator's state at the start
  of the epoch and the number of items (captions) already taken, so a resumed run sees exactly the batches it has not
  seen.
- **Checkpoints**: at every validation (every ``val_step`` iterations and at each epoch end) ``checkpoint.pth`` (last)
  and, when the dev rsum improved, ``model_best.pth``, both written atomically with the config, the vocabulary, the
  optimizer / scheduler / grad-scaler state and every RNG state (torch, CUDA, numpy, python, sampler). A checkpoint
  alone is enough to evaluate (``evaluate.py``) or to continue exactly (``--resume``).
- **Ctrl-C** is deferred while a step or a save is in progress, then saves a resumable ``checkpoint.pth`` and
  re-raises ``KeyboardInterrupt``.
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
import dataclasses
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Config
from ..data.graphs import parse_edge_spec
from ..data.precomp import CaptionDataset, PrecompSplit
from ..data.vocab import Vocabulary, build_vocab
from ..errors import CheckpointError, ConfigError, DataError, TrainingError, os_error_reason
from ..nn.layers import LAYERS
from ..nn.loss import ContrastiveLoss, ImageTextContrastive
from ..nn.model import HSCModel, build_model
from ..nn.similarity import HEADS
from . import distributed
from .checkpoint import read_checkpoint, save_checkpoint
from .evaluation import VALIDATION_IMAGES, autocast, evaluate, resolve_device
from .metrics import RECALL_KEYS

CHECKPOINT = "checkpoint.pth"
BEST = "model_best.pth"
#: Options that shape the model's weights: they cannot change when resuming.
ARCHITECTURE = ("preset", "embed_size", "word_dim", "sim_dim", "img_gnn", "txt_gnn", "img_layers", "txt_layers",
                "head", "sgr_step", "gru_layers", "align_levels", "vocab_path", "vocab_threshold")

Log = Callable[[str], None]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, after a resumable checkpoint was saved at ``path``."""

    def __init__(self, path: Path, iteration: int) -> None:
        super().__init__(f"interrupted at iteration {iteration}; saved {path}")
        self.path, self.iteration = path, iteration


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


# --------------------------------------------------------------------------- config checks
def check_config(config: Config) -> None:
    """ConfigError for option values the loop cannot run with."""
    positive = ("batch_size", "num_epochs", "lr_update", "val_step", "log_step", "embed_size", "word_dim", "sim_dim")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, found {getattr(config, name)}")
    if not config.learning_rate > 0:
        raise ConfigError(f"--learning_rate must be positive, found {config.learning_rate}")
    for name in ("grad_clip", "margin", "max_violation_after", "workers"):
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name} must not be negative, found {getattr(config, name)}")
    if not config.itc_weight >= 0 or not math.isfinite(config.itc_weight):
        raise ConfigError(f"--itc_weight must be a finite number >= 0, found {config.itc_weight}")
    if config.itc_loss not in ImageTextContrastive.KINDS:
        raise ConfigError(f"--itc_loss {config.itc_loss!r} is unknown; choose {' or '.join(ImageTextContrastive.KINDS)}")
    if config.nan_policy not in ("stop", "skip"):
        raise ConfigError(f"--nan_policy {config.nan_policy!r} is unknown; choose stop or skip")
    # names are resolved deep inside the model and the data set: say which flag is wrong
    for flag, choices in (("img_gnn", LAYERS), ("txt_gnn", LAYERS), ("head", HEADS)):
        name = getattr(config, flag)
        if name not in choices:
            raise ConfigError(f"--{flag} {name!r} is unknown; choose one of {', '.join(sorted(choices))}")
    for flag in ("img_edges", "txt_edges"):
        try:
            parse_edge_spec(getattr(config, flag))
        except ConfigError as e:
            raise ConfigError(f"--{flag}: {e}") from None
    config.levels()


def check_resumable(checkpoint: dict[str, Any], source: str) -> None:
    """CheckpointError unless ``checkpoint`` holds the training state (a model_best.pth or a converted official
    checkpoint holds weights only)."""
    if "optimizer" not in checkpoint or "sampler" not in checkpoint:
        raise CheckpointError(f"{source} holds weights but no training state, so it cannot be resumed; resume from "
                              "the run's checkpoint.pth, or evaluate this one with evaluate.py")


def resume_config(checkpoint: dict[str, Any], overrides: dict[str, Any], source: str) -> Config:
    """The config of a resumed run: the checkpoint's, with the options given on the command line (not the
    architecture: the saved weights fix it)."""
    check_resumable(checkpoint, source)
    base = Config.from_dict(checkpoint["config"], source=source)
    changed = [k for k in ARCHITECTURE if k in overrides and overrides[k] != getattr(base, k)]
    if changed:
        raise ConfigError(f"--{changed[0]} cannot change when resuming {source} (it was {getattr(base, changed[0])!r}); "
                          "start a new run with --model_name NEW_FOLDER instead")
    return dataclasses.replace(base, **overrides)


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


def prepare_output(folder: Path, overwrite: bool, resuming: bool, log_folder: Path | None = None) -> None:
    """Refuse to write into a folder that holds another run's checkpoints (unless ``--overwrite`` or ``--resume``);
    fail before anything is replaced when it or the TensorBoard folder ``log_folder`` cannot be written."""
    existing = [name for name in (CHECKPOINT, BEST) if (folder / name).exists()]
    if existing and not (overwrite or resuming):
        raise ConfigError(f"{folder} already holds {' and '.join(existing)} of another run; pass --resume "
                          f"{folder / CHECKPOINT} to continue it, --overwrite to replace it, or another --model_name")
    targets = [(folder, "checkpoints", "--model_name"), (log_folder, "TensorBoard logs", "--logger_name")]
    for target, what, flag in targets:
        if target is None:
            continue
        try:
            target.mkdir(parents=True, exist_ok=True)
            probe = target / ".write_test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cannot write {what} into {target} ({os_error_reason(e)}); "
                              f"choose a writable {flag}") from None


# --------------------------------------------------------------------------- Ctrl-C
class DeferredInterrupt:
    """SIGINT raises ``KeyboardInterrupt`` at once, except inside :meth:`critical` (a training step, a save), where it
    is held until the block ends, so that the state saved on interrupt is always that of a step boundary."""

    def __init__(self) -> None:
        self.depth, self.pending, self.previous = 0, False, None

    def _handler(self, signum, frame) -> None:
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator["DeferredInterrupt"]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach the main thread only; nothing to defer here
            return
        self.previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, self.previous)

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


# --------------------------------------------------------------------------- one step
def train_step(model: torch.nn.Module, pairs, criterion: ContrastiveLoss, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, config: Config, device: torch.device, hardest: bool,
               itc: ImageTextContrastive | None = None) -> tuple[float, torch.Tensor]:
    """Forward, loss, backward, clip, update. Returns the loss and the ``[B, B]`` scores; when the loss or the
    gradient norm is not finite, nothing is updated and the loss returned is NaN or inf (a NaN for a bad gradient).
    The loss is the hinge loss of the exact scores plus ``config.itc_weight`` times the first stage's contrastive
    loss ``itc`` (not computed at all when the weight is 0: the papers' loss exactly).

    ``model`` maps a PairBatch to scores: the HSCModel, or its DistributedDataParallel wrapper; with several processes
    the loss returned is the mean over the ranks, so that all of them skip a non-finite step together."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, config.amp):
        out = model(pairs)
    scores = out.scores
    loss = criterion(scores.float(), max_violation=hardest)
    if config.itc_weight:
        loss = loss + config.itc_weight * itc(out.cosine.float(), out.scale.float(), max_violation=hardest)
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


def train(config: Config, resume: str | Path | dict[str, Any] | None = None, *, dry_run: bool = False,
          overwrite: bool = False, max_iters: int | None = None, log: Log | None = None,
          progress: bool = False, gather_negatives: bool = False) -> TrainResult:
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

    Under torchrun every process calls it (inside :func:`~hsc_pyg.engine.distributed.process_group`, as train.py
    does); each process takes ``config.batch_size`` captions per step.
    """
    main = distributed.is_main()
    log = log if log is not None and main else (lambda line: None)
    check_config(config)
    device = distributed.local_device(resolve_device(config.device))
    autocast(device, config.amp)  # fails early on an --amp the device cannot do
    out = Path(config.model_name)
    checkpoint = None
    if resume is not None:
        checkpoint = resume if isinstance(resume, dict) else read_checkpoint(resume)
        check_resumable(checkpoint, "the checkpoint" if isinstance(resume, dict) else str(resume))
    if not dry_run and main:
        prepare_output(out, overwrite, resuming=checkpoint is not None, log_folder=Path(config.logger_name))
    seed_everything(config.seed + distributed.get_rank(), config.deterministic)  # rank 0's weights go to all (DDP)

    # ---- data and vocabulary
    saved_vocab = Vocabulary.from_dict(checkpoint["vocab"]) if checkpoint and checkpoint.get("vocab") else None
    train_split, dev_split, vocab = open_data(config, saved_vocab)
    if checkpoint and (train_split.img_dim, train_split.num_regions) != (config.img_dim, config.num_regions):
        raise DataError(f"{train_split.file('ims.npy')} has {train_split.num_regions} x {train_split.img_dim} "
                        f"features per image but the checkpoint was trained on {config.num_regions} x "
                        f"{config.img_dim}; resume on the dataset it was trained on")
    config = dataclasses.replace(config, img_dim=train_split.img_dim, num_regions=train_split.num_regions,
                                 vocab_size=len(vocab))
    dataset = CaptionDataset(train_split, vocab, config.img_edges, config.txt_edges)
    batch_sampler = distributed.DistributedBatchSampler(len(dataset), config.batch_size)
    batches_per_epoch = batch_sampler.steps_per_epoch()
    if batches_per_epoch == 0:
        raise ConfigError(f"--batch_size {config.batch_size} x {batch_sampler.world} processes is more than the "
                          f"{len(dataset)} captions of {train_split.file('caps.txt')}; use a smaller --batch_size")

    # ---- model, optimizer, schedule
    model = build_model(config).to(device)
    model.vocab = vocab
    criterion = ContrastiveLoss(config.margin, config.max_violation)
    itc = ImageTextContrastive(config.itc_loss, config.margin, config.max_violation)
    # the first stage learns only with its loss on; otherwise its parameters stay as built (no gradient, no update)
    model.first_stage.requires_grad_(config.itc_weight > 0)
    if config.itc_weight > 0:
        model.first_stage.trained.fill_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_update, gamma=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    sampler_generator = torch.Generator().manual_seed(config.seed)
    sampler = SamplerState(sampler_generator.get_state())
    epoch, iteration, best_rsum = 0, 0, -math.inf

    # ---- resume
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scheduler.step_size = config.lr_update  # a --lr_update given on resume applies from here on
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if main:  # the other ranks keep their own dropout streams (seed + rank)
            set_rng_state(checkpoint["rng"])
        sampler = SamplerState(checkpoint["sampler"]["epoch_start"], int(checkpoint["sampler"]["position"]))
        epoch, iteration, best_rsum = int(checkpoint["epoch"]), int(checkpoint["iteration"]), float(checkpoint["best_rsum"])
        log(f"resumed at epoch {epoch}, iteration {iteration} (best dev rsum {best_rsum:.1f})"
            + (f", on {batch_sampler.world} process(es) instead of {checkpoint.get('world_size', 1)}"
               if checkpoint.get("world_size", 1) != batch_sampler.world else ""))
    else:
        processes = f" x {batch_sampler.world} processes" if batch_sampler.world > 1 else ""
        log(f"{config.preset}: {model.num_parameters():,} parameters, vocabulary {len(vocab)}, "
            f"{len(dataset)} train captions ({batches_per_epoch} batches of {config.batch_size}{processes}), "
            f"{dev_split.num_images} dev images, on {device}")
    # ---- several processes: DDP over the model (or over its forward with the global batch's negatives)
    net = distributed.wrap_model(distributed.GatheredNegatives(model) if gather_negatives else model, device)
    writer = None
    if not dry_run and main:
        if checkpoint is None:  # --overwrite: the other run's checkpoints go now that the inputs have been checked
            for name in (CHECKPOINT, BEST):
                (out / name).unlink(missing_ok=True)
        vocab.save(out / "vocab.json")
        config.save(out / "config.json")
        from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

        writer = SummaryWriter(config.logger_name, purge_step=iteration + 1 if checkpoint else None)

    last_saved = iteration if checkpoint is not None else None

    def save(path: Path) -> None:
        nonlocal last_saved
        if main:
            save_checkpoint(path, model, epoch=epoch, iteration=iteration, best_rsum=best_rsum,
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            scaler=scaler.state_dict(), rng=rng_state(), world_size=batch_sampler.world,
                            sampler={"epoch_start": sampler.epoch_start, "position": sampler.position})
        if path.name == CHECKPOINT:
            last_saved = iteration

    def validate() -> dict[str, Any]:
        start = time.perf_counter()
        distributed.broadcast_buffers(model)  # every rank evaluates rank 0's model, the one saved
        metrics = evaluate(model, dev_split, vocab, max_images=VALIDATION_IMAGES, batch_size=config.batch_size,
                           amp=config.amp, chunk_mb=config.score_chunk_mb)
        metrics["seconds"] = time.perf_counter() - start
        if writer is not None:
            for key in (*RECALL_KEYS, "rsum"):
                writer.add_scalar(f"val/{key}", metrics[key], iteration)
        return metrics

    def record(metrics: dict[str, Any]) -> None:
        """Save the last checkpoint, and the best one when the dev rsum improved (inside a critical section)."""
        nonlocal best_rsum
        improved = metrics["rsum"] > best_rsum
        best_rsum = max(best_rsum, metrics["rsum"])
        save(out / CHECKPOINT)
        if improved:
            save(out / BEST)
        log(f"epoch {epoch if sampler.position else epoch - 1} iter {iteration} dev: {format_metrics(metrics)}"
            f"{' (best)' if improved else f' (best {best_rsum:.1f})'} [{metrics['seconds']:.0f} s]")

    # ---- the loop
    result = TrainResult(iteration, epoch, best_rsum, model=model)
    guard = DeferredInterrupt()
    model.train()
    last_log_time, last_log_iter = time.perf_counter(), iteration
    if max_iters is not None and iteration >= max_iters:
        log(f"nothing to do: the run is at iteration {iteration} and --max_iters is {max_iters}")
        return result
    try:
        with guard.installed():
            while epoch < config.num_epochs:
                sampler_generator.set_state(sampler.epoch_start)
                batch_sampler.set_epoch(sampler_generator, start=sampler.position)
                loader = DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=dataset.collate_fn,
                                    num_workers=config.workers, generator=torch.Generator().manual_seed(config.seed),
                                    pin_memory=device.type == "cuda")
                hardest = config.max_violation and epoch >= config.max_violation_after
                bar = tqdm(loader, desc=f"epoch {epoch}", initial=batches_per_epoch - len(batch_sampler),
                           total=batches_per_epoch, disable=not progress or dry_run or not main, dynamic_ncols=True,
                           leave=False)
                for pairs in bar:
                    with guard.critical():
                        pairs = pairs.to(device, non_blocking=True)
                        loss_value, scores = train_step(net, pairs, criterion, optimizer, scaler, config, device,
                                                        hardest, itc)
                        if not math.isfinite(loss_value):
                            if config.nan_policy == "stop":
                                kept = (f"{out / CHECKPOINT} (iteration {last_saved}) is the last good checkpoint"
                                        if last_saved is not None else "no checkpoint of this run was saved")
                                raise TrainingError(
                                    f"the loss or the gradient became non-finite (loss {loss_value}) at epoch {epoch}, "
                                    f"iteration {iteration + 1}; training stopped and {kept}; lower --learning_rate, "
                                    "use --amp off, or pass --nan_policy skip to skip such batches")
                            result.skipped += 1
                            log(f"epoch {epoch} iter {iteration + 1}: non-finite loss or gradient ({loss_value}), "
                                f"batch skipped ({result.skipped} so far)")
                        iteration += 1
                        sampler.position += batch_sampler.global_batch
                        result.losses.append((iteration, loss_value))
                    bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
                    if dry_run:
                        log(f"dry run: one batch of {len(pairs)} captions / {pairs.images.num_graphs} images, "
                            f"scores {list(scores.shape)}, loss {loss_value:.4f}; nothing written")
                        result.iteration, result.epoch = iteration, epoch
                        return result
                    if writer is not None and iteration % config.log_step == 0:
                        now = time.perf_counter()
                        writer.add_scalar("train/loss", loss_value, iteration)
                        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], iteration)
                        writer.add_scalar("train/steps_per_s", (iteration - last_log_iter) / (now - last_log_time),
                                          iteration)
                        last_log_time, last_log_iter = now, iteration
                    end_of_epoch = batch_sampler.steps_per_epoch(sampler.position) == 0
                    if iteration % config.val_step == 0 and not end_of_epoch:
                        result.metrics = validate()
                        with guard.critical():
                            record(result.metrics)
                        last_log_time, last_log_iter = time.perf_counter(), iteration
                    if max_iters is not None and iteration >= max_iters:
                        break
                bar.close()
                if batch_sampler.steps_per_epoch(sampler.position) > 0:  # stopped by max_iters
                    with guard.critical():
                        save(out / CHECKPOINT)
                    log(f"stopped at iteration {iteration} (--max_iters); resume with --resume {out / CHECKPOINT}")
                    break
                result.metrics = validate()
                with guard.critical():
                    scheduler.step()
                    epoch += 1
                    sampler.epoch_start, sampler.position = sampler_generator.get_state(), 0
                    record(result.metrics)
                last_log_time, last_log_iter = time.perf_counter(), iteration
                if max_iters is not None and iteration >= max_iters:
                    break
    except KeyboardInterrupt:
        if dry_run:
            raise
        with guard.critical():
            save(out / CHECKPOINT)
        raise Interrupted(out / CHECKPOINT, iteration) from None
    finally:
        if writer is not None:
            writer.close()
    result.iteration, result.epoch, result.best_rsum = iteration, epoch, best_rsum
    return result


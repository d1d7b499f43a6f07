"""torch.distributed on the CPU: 2 processes (gloo, started by torch.multiprocessing.spawn with torchrun's env://
variables) evaluate with the same numbers as one process, train like the equivalent single-process computation, and
write checkpoints that one process resumes.

Starting the processes costs ~10 s (each imports torch and PyG), so one job runs every 2-process part once
(:func:`_job`) and the tests compare its files with references computed here.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from hsc_pyg.config import Config
from hsc_pyg.data.precomp import CaptionDataset, PrecompSplit
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.data.vocab import build_vocab
from hsc_pyg.engine import blocking, distributed
from hsc_pyg.engine.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from hsc_pyg.engine.distributed import DistributedBatchSampler, GatheredNegatives
from hsc_pyg.engine.scoring import encode_split, evaluate, score_matrix, score_matrix_distributed
from hsc_pyg.engine.train import CHECKPOINT, resume_config, seed_everything, train
from hsc_pyg.nn.loss import ContrastiveLoss, ImageTextContrastive
from hsc_pyg.nn.model import ImageEncoding, build_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate as evaluate_cli  # noqa: E402  (the command line at the project root)

WORLD = 2
EVAL_BLOCK = 4  # image rows per scoring block: 20 test images -> rank 0 scores rows 0-11, rank 1 rows 12-19
BATCH = 4  # captions per rank and step: 50 train captions, global batches of 8, 6 steps per epoch
DDP_STEPS, RESUMED_STEPS = 3, 5
# dropout off: the reference below cannot replay each rank's dropout masks
TRAIN = dict(data_name="synthetic_precomp", embed_size=16, word_dim=8, sim_dim=8, img_layers=2, txt_layers=2,
             batch_size=BATCH, vocab_threshold=1, val_step=1000, log_step=1, num_epochs=3, device="cpu", seed=3,
             word_dropout=0.0, sa_dropout=0.0)


# --------------------------------------------------------------------------- running 2 processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, folder: str) -> None:
    """One process of the job: torchrun's variables, then :func:`_job` inside the process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        with distributed.process_group(torch.device("cpu")):
            _job(Path(folder))
    except BaseException:
        (Path(folder) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


@contextlib.contextmanager
def one_thread():
    """The workers' thread count for a reference computation: a CPU matrix product's rounding may depend on how many
    threads share it, so one process compares with another only at the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- data, models, the job
def train_config(data: Path, run: Path, **changes) -> Config:
    return Config(data_path=str(data), model_name=str(run / "checkpoint"), logger_name=str(run / "log"),
                  **{**TRAIN, **changes})


def model_config(data: Path) -> Config:
    """The training config with the sizes train() reads from the data (16 x 16 features, the built vocabulary)."""
    vocab = build_vocab(PrecompSplit.open(data, "synthetic_precomp", "train").captions, threshold=1)
    return train_config(data, data).replace(img_dim=16, num_regions=16, vocab_size=len(vocab))


def caption_data(data: Path) -> CaptionDataset:
    split = PrecompSplit.open(data, "synthetic_precomp", "train")
    return CaptionDataset(split, build_vocab(split.captions, threshold=1))


def collate(dataset: CaptionDataset, items) -> object:
    return dataset.collate_fn([dataset[int(i)] for i in items])


def epoch_order(seed: int = TRAIN["seed"]) -> torch.Tensor:
    """The training sampler's first permutation of the 50 train captions."""
    return torch.randperm(50, generator=torch.Generator().manual_seed(seed))


def rank_shards(start: int, world: int = WORLD) -> list[torch.Tensor]:
    """The items of each rank in the global step that begins at item ``start`` of the epoch."""
    order = epoch_order()
    return [order[start + r * BATCH:start + (r + 1) * BATCH] for r in range(world)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root / "synthetic_precomp", num_train=10, num_dev=10, num_test=20, img_dim=16, num_regions=16)
    return root


@pytest.fixture(scope="module")
def job(data, tmp_path_factory) -> Path:
    """A tiny checkpoint for evaluation, and what the 2 processes computed (files in the returned folder)."""
    folder = tmp_path_factory.mktemp("job")
    vocab = build_vocab(PrecompSplit.open(data, "synthetic_precomp", "train").captions, threshold=1)
    torch.manual_seed(0)
    model = build_model(Config(img_dim=16, num_regions=16, vocab_size=len(vocab), embed_size=32, word_dim=8,
                               sim_dim=8))
    model.vocab = vocab
    save_checkpoint(folder / "model.pth", model)
    (folder / "data").write_text(str(data))
    try:
        mp.spawn(_entry, args=(_free_port(), str(folder)), nprocs=WORLD, join=True)
    except Exception:
        pytest.fail("the 2-process job failed:\n" + "\n".join(p.read_text() for p in folder.glob("error*.txt")))
    return folder


def _cli_args(folder: Path, data: Path, out: str) -> list[str]:
    return ["--model", str(folder / "model.pth"), "--data_path", str(data), "--split", "test", "--device", "cpu",
            "--no_progress", "--json", str(folder / out)]


def _job(folder: Path) -> None:
    """Everything the tests ask of 2 processes; each rank saves what it saw as ``<part><rank>.pt``."""
    rank, data = distributed.get_rank(), Path((folder / "data").read_text())

    # evaluation: the library, then the command line
    model = load_checkpoint(folder / "model.pth")
    split = PrecompSplit.open(data, "synthetic_precomp", "test")
    img_enc, captions = encode_split(model, split, progress=False)
    sims = score_matrix_distributed(model, img_enc, captions, block_images=EVAL_BLOCK, progress=False)
    torch.save({"sims": sims, "metrics": evaluate(model, split), "rows": distributed.shard_rows(20, EVAL_BLOCK)},
               folder / f"eval{rank}.pt")
    evaluate_cli.main(_cli_args(folder, data, "cli.json"))

    # training with per-rank negatives, stopped mid-epoch (rank 0 writes a resumable checkpoint)
    with open(folder / f"log{rank}.txt", "w") as log:
        result = train(train_config(data, folder / "ddp"), max_iters=DDP_STEPS, log=lambda line: log.write(line))
    torch.save({"losses": result.losses, "weights": dict(result.model.named_parameters())}, folder / f"ddp{rank}.pt")

    # one step of the gathered-negatives forward in DDP: the gradient every rank ends up with
    torch.manual_seed(0)
    model = build_model(model_config(data)).train()
    model.first_stage.requires_grad_(False)   # as train() does without the first stage's loss
    net = distributed.wrap_model(GatheredNegatives(model), torch.device("cpu"))
    scores = net(collate(caption_data(data), rank_shards(0)[rank])).scores
    loss = ContrastiveLoss()(scores)
    loss.backward()
    torch.save({"scores": scores.detach(), "loss": loss.item(),
                "grads": {name: p.grad for name, p in model.named_parameters()}}, folder / f"gathered{rank}.pt")

    # the same with the first stage's contrastive loss (--itc_weight 1): its cosines are those of the global batch
    torch.manual_seed(0)
    model = build_model(model_config(data)).train()
    net = distributed.wrap_model(GatheredNegatives(model), torch.device("cpu"))
    out = net(collate(caption_data(data), rank_shards(0)[rank]))
    loss = ContrastiveLoss()(out.scores) + ImageTextContrastive()(out.cosine, out.scale)
    loss.backward()
    torch.save({"cosine": out.cosine.detach(), "loss": loss.item(),
                "grads": {name: p.grad for name, p in model.named_parameters()}}, folder / f"gathered_itc{rank}.pt")

    # training with gathered negatives
    result = train(train_config(data, folder / "gathered"), max_iters=1, gather_negatives=True)
    torch.save({"losses": result.losses, "weights": dict(result.model.named_parameters())},
               folder / f"gathered_run{rank}.pt")


def load(folder: Path, part: str, rank: int) -> dict:
    return torch.load(folder / f"{part}{rank}.pt", weights_only=False)


# --------------------------------------------------------------------------- the equivalent single-process computations
def per_rank_steps(model, optimizer, dataset, config: Config, start: int, steps: int, world: int) -> list[float]:
    """What ``steps`` DDP steps with per-rank negatives compute, in one process: each rank's ``[B, B]`` loss on its
    slice of the global batch, the mean of the ranks' gradients (DDP's all-reduce), clipping, Adam. Rank 0's
    BatchNorm running statistics are kept (DDP broadcasts them from rank 0 at every forward). The first stage is
    frozen, as train() freezes it without its loss (--itc_weight 0)."""
    model.first_stage.requires_grad_(False)
    criterion, losses = ContrastiveLoss(config.margin), []
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        before = {k: b.clone() for k, b in model.named_buffers()}
        grads, rank_losses = [], []
        for r, items in enumerate(rank_shards(start + step * BATCH * world, world)):
            model.load_state_dict(before, strict=False)
            loss = criterion(blocking.BatchScores(model)(collate(dataset, items)).scores)
            grads.append(torch.autograd.grad(loss, params))
            rank_losses.append(loss.item())
            if r == 0:
                kept = {k: b.clone() for k, b in model.named_buffers()}
        model.load_state_dict(kept, strict=False)
        for p, *per_rank in zip(params, *grads):
            p.grad = sum(per_rank) / world
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        losses.append(sum(rank_losses) / world)
    return losses


def global_batch_scores(model, dataset, shards: list[torch.Tensor]) -> torch.Tensor:
    """The matrix GatheredNegatives distributes, in one process: each rank's images encoded together (their
    BatchNorm statistics), then every image of the global batch against every caption, rows by caption."""
    batches = [collate(dataset, items) for items in shards]
    images = [model.encode_images(b.images) for b in batches]
    all_images = ImageEncoding.cat(images)
    columns = torch.cat([blocking.score(model, all_images, model.encode_captions(b.captions)) for b in batches], 1)
    offsets = np.cumsum([0] + [len(i) for i in images[:-1]])
    return columns[torch.cat([b.img_index + int(o) for b, o in zip(batches, offsets)])]


def global_batch_cosine(model, dataset, shards: list[torch.Tensor]) -> torch.Tensor:
    """The first-stage cosine matrix of the global batch, in one process: row b = global caption b's image."""
    batches = [collate(dataset, items) for items in shards]
    stage = model.first_stage
    images = [stage.image_vectors(model.encode_images(b.images).glo) for b in batches]
    captions = torch.cat([stage.caption_vectors(model.encode_captions(b.captions).glo) for b in batches])
    offsets = np.cumsum([0] + [len(i) for i in images[:-1]])
    rows = torch.cat([b.img_index + int(o) for b, o in zip(batches, offsets)])
    return torch.cat(images)[rows] @ captions.T


def initial_model(config: Config):
    """Rank 0's initial weights, which DDP copies to every rank: train()'s seed, then build_model."""
    seed_everything(config.seed)
    return build_model(config).train()


def assert_states_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


# --------------------------------------------------------------------------- the pieces, without processes
def test_shards_are_whole_blocks_that_cover_the_rows_once():
    shards = [distributed.shard_rows(1000, 128, r, 8) for r in range(8)]
    assert [len(s) for s in shards] == [128] * 7 + [104]
    assert [i for s in shards for i in s] == list(range(1000))
    assert all(s.start % 128 == 0 for s in shards)
    assert [len(distributed.shard_rows(20, 4, r, 2)) for r in range(2)] == [12, 8]
    assert [len(distributed.shard_rows(20, 128, r, 2)) for r in range(2)] == [20, 0]


def test_batch_sampler_gives_ranks_consecutive_slices_and_resumes_with_any_world_size():
    def batches(rank, world, start=0):
        sampler = DistributedBatchSampler(50, 4, rank, world)
        sampler.set_epoch(torch.Generator().manual_seed(7), start)
        return list(sampler)

    order = torch.randperm(50, generator=torch.Generator().manual_seed(7)).tolist()
    assert batches(0, 1) == [order[i:i + 4] for i in range(0, 48, 4)]  # one process: the permutation in batches
    two = [batches(r, 2) for r in range(2)]
    assert [len(b) for b in two] == [6, 6]  # 48 of the 50 items; the incomplete global batch is dropped
    assert [item for step in zip(*two) for batch in step for item in batch] == order[:48]
    # 3 steps of 2 ranks took order[:24]; one process resuming from item 24 takes the rest of the epoch
    assert batches(0, 1, start=24) == [order[i:i + 4] for i in range(24, 48, 4)]


# --------------------------------------------------------------------------- distributed evaluation
def test_distributed_score_matrix_equals_the_single_process_one_exactly(job, data):
    model = load_checkpoint(job / "model.pth")
    split = PrecompSplit.open(data, "synthetic_precomp", "test")
    with one_thread():
        expected = score_matrix(model, *encode_split(model, split, progress=False), block_images=EVAL_BLOCK,
                                progress=False)
    ranks = [load(job, "eval", r) for r in range(WORLD)]
    assert [ranks[r]["rows"] for r in range(WORLD)] == [range(0, 12), range(12, 20)]  # both ranks scored rows
    assert ranks[1]["sims"] is None  # the matrix is gathered on rank 0 only
    assert ranks[0]["sims"].shape == expected.shape == (20, 100)
    assert np.array_equal(ranks[0]["sims"], expected)


def test_distributed_evaluate_gives_every_rank_the_single_process_metrics(job, data):
    model = load_checkpoint(job / "model.pth")
    with one_thread():
        expected = evaluate(model, PrecompSplit.open(data, "synthetic_precomp", "test"))
    for r in range(WORLD):
        assert load(job, "eval", r)["metrics"] == expected


def test_evaluate_cli_under_torchrun_reports_the_single_process_numbers_from_rank_0(job, data):
    with one_thread():
        assert evaluate_cli.main(_cli_args(job, data, "single.json")) == 0
    single, distributed_run = (json.loads((job / name).read_text()) for name in ("single.json", "cli.json"))
    single.pop("seconds"), distributed_run.pop("seconds")
    assert distributed_run == single


# --------------------------------------------------------------------------- DDP training
def test_ddp_steps_with_per_rank_negatives_equal_the_mean_of_the_per_rank_gradients(job, data):
    config = model_config(data)
    with one_thread():
        model = initial_model(config)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        losses = per_rank_steps(model, optimizer, caption_data(data), config, 0, DDP_STEPS, WORLD)

    ranks = [load(job, "ddp", r) for r in range(WORLD)]
    saved = read_checkpoint(job / "ddp" / "checkpoint" / CHECKPOINT)
    assert_states_close(saved["model"], model.state_dict(), atol=1e-6)  # weights and rank 0's running statistics
    assert_states_close(ranks[1]["weights"], ranks[0]["weights"], atol=0)  # every rank holds the same weights ...
    assert [loss for _, loss in ranks[0]["losses"]] == pytest.approx(losses, abs=1e-6)  # ... and logs the mean loss
    assert saved["sampler"]["position"] == DDP_STEPS * BATCH * WORLD and saved["world_size"] == WORLD
    assert (job / "log0.txt").read_text() and not (job / "log1.txt").read_text()  # rank 0 alone logs


def test_checkpoint_of_the_2_process_run_resumes_in_1_process(job, data, tmp_path):
    config = model_config(data)
    with one_thread():
        model = initial_model(config)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        dataset = caption_data(data)
        per_rank_steps(model, optimizer, dataset, config, 0, DDP_STEPS, WORLD)
        # one process goes on from item 24 of the epoch, 4 captions per step
        losses = per_rank_steps(model, optimizer, dataset, config, DDP_STEPS * BATCH * WORLD,
                                RESUMED_STEPS - DDP_STEPS, 1)
        checkpoint = read_checkpoint(job / "ddp" / "checkpoint" / CHECKPOINT)
        elsewhere = {"model_name": str(tmp_path / "checkpoint"), "logger_name": str(tmp_path / "log")}
        resumed = train(resume_config(checkpoint, elsewhere, source="2-process checkpoint"), resume=checkpoint,
                        max_iters=RESUMED_STEPS)

    assert resumed.iteration == RESUMED_STEPS and resumed.epoch == 0
    assert [loss for _, loss in resumed.losses] == pytest.approx(losses, abs=1e-6)
    assert_states_close(resumed.model.state_dict(), model.state_dict(), atol=1e-6)
    saved = read_checkpoint(tmp_path / "checkpoint" / CHECKPOINT)
    assert saved["sampler"]["position"] == DDP_STEPS * BATCH * WORLD + (RESUMED_STEPS - DDP_STEPS) * BATCH
    assert saved["world_size"] == 1


def test_gathered_negatives_give_every_rank_the_gradient_of_the_global_batch_loss(job, data):
    with one_thread():
        torch.manual_seed(0)
        model = build_model(model_config(data)).train()
        scores = global_batch_scores(model, caption_data(data), rank_shards(0))
        loss = ContrastiveLoss()(scores)
        loss.backward()

    ranks = [load(job, "gathered", r) for r in range(WORLD)]
    assert scores.shape == (BATCH * WORLD, BATCH * WORLD)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["scores"], scores.detach(), rtol=0, atol=1e-6)
        assert ranks[r]["loss"] == pytest.approx(loss.item(), abs=1e-5)
        assert_states_close(ranks[r]["grads"], {n: p.grad for n, p in model.named_parameters()}, atol=1e-6)


def test_gathered_negatives_with_the_first_stage_loss_give_the_global_batch_gradient(job, data):
    with one_thread():
        torch.manual_seed(0)
        model = build_model(model_config(data)).train()
        dataset, shards = caption_data(data), rank_shards(0)
        cosine = global_batch_cosine(model, dataset, shards)
        loss = (ContrastiveLoss()(global_batch_scores(model, dataset, shards))
                + ImageTextContrastive()(cosine, model.first_stage.scale()))
        loss.backward()

    ranks = [load(job, "gathered_itc", r) for r in range(WORLD)]
    assert cosine.shape == (BATCH * WORLD, BATCH * WORLD)
    first_stage = {n for n, p in model.named_parameters() if n.startswith("first_stage.")}
    assert first_stage and all(model.get_parameter(n).grad.abs().sum() > 0 for n in first_stage)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["cosine"], cosine.detach(), rtol=0, atol=1e-6)
        assert ranks[r]["loss"] == pytest.approx(loss.item(), abs=1e-5)
        # gradients up to ~5 here (the inverse temperature 14.3 scales them): float32 rounding reaches 2e-6
        assert_states_close(ranks[r]["grads"], {n: p.grad for n, p in model.named_parameters()}, atol=1e-5)


def test_training_with_gathered_negatives_starts_from_the_global_batch_loss(job, data):
    config = model_config(data)
    with one_thread(), torch.no_grad():
        model = initial_model(config)
        expected = ContrastiveLoss(config.margin)(global_batch_scores(model, caption_data(data), rank_shards(0)))
    ranks = [load(job, "gathered_run", r) for r in range(WORLD)]
    assert ranks[0]["losses"] == ranks[1]["losses"] == [(1, pytest.approx(expected.item(), abs=1e-5))]
    assert_states_close(ranks[1]["weights"], ranks[0]["weights"], atol=0)

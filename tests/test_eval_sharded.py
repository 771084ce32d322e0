"""Evaluation that scales: on 2 gloo ranks each rank embeds half of the
held-out set and the embeddings are gathered; the rows and every retrieval
and zero-shot figure equal the single-process ones. Similarities are computed in blocks, with the same
figures as the whole N×N matrix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from mm_models import PretrainModel
from mm_models.objectives import MODALITIES
from train.config import compose
from train.distributed import _free_port
from train.heldout import evaluate_heldout
from train.metrics import retrieval_metrics

pytestmark = pytest.mark.integration  # spawns processes: not in the fast tier

WORLD = 2


def _setup(shards: dict[str, str]):
    cfg = OmegaConf.to_object(
        compose(
            [
                "experiment=demo",
                "fusion=concat",
                "objective=matching",
                f"data.train={shards['train']}",
                f"data.heldout={shards['heldout']}",
                "data.num_workers=0",
            ]
        )
    )
    torch.manual_seed(0)
    model = PretrainModel(cfg.model, cfg.fusion, cfg.objective)
    model.init_weights()
    return cfg, model


def _evaluate(shards: dict[str, str], *, rank: int = 0, world: int = 1) -> dict:
    cfg, model = _setup(shards)
    # 64 held-out samples, batches of 12: each rank gets 32 in 3 batches, the last one padded.
    return evaluate_heldout(
        model,
        data=cfg.data,
        batch_size=12,
        device=torch.device("cpu"),
        dtype=torch.float32,
        keep_split=True,
        rank=rank,
        world_size=world,
    )


def _worker(rank: int, port: int, shards: dict[str, str], tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(_evaluate(shards, rank=rank, world=WORLD), Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_evaluate_as_one_process(demo_shards, tmp_path):
    shards = {k: str(demo_shards[k]) for k in ("train", "heldout")}
    mp.spawn(_worker, args=(_free_port(), shards, str(tmp_path)), nprocs=WORLD, join=True)
    single = _evaluate(shards)
    assert single["split"]["keys"] and len(single["split"]["keys"]) == 64
    for rank in range(WORLD):
        sharded = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert sharded["split"]["embedded_here"] == 32  # half the work each...
        # ...and the same rows in the same order, then the same figures.
        assert sharded["split"]["keys"] == single["split"]["keys"]
        for m in MODALITIES:
            torch.testing.assert_close(
                sharded["split"]["embeds"][m], single["split"]["embeds"][m], rtol=1e-5, atol=1e-6
            )
            assert torch.equal(sharded["split"]["masks"][m], single["split"]["masks"][m])
        assert torch.equal(sharded["split"]["labels"], single["split"]["labels"])
        # The matching head's swap partner is the next sample of the same
        # batch, and batches differ when sharded: the same tuples are counted,
        # against other partners.
        assert sharded["matching"]["n"] == single["matching"]["n"] > 100
        for key in ("retrieval", "zero_shot"):
            assert sharded[key].keys() == single[key].keys() and single[key], key
            _assert_close_tree(sharded[key], single[key])


def _assert_close_tree(a, b, path: str = "") -> None:
    if isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for k in b:
            _assert_close_tree(a[k], b[k], f"{path}/{k}")
    else:
        assert a == pytest.approx(b, abs=1e-6), path


def test_blockwise_similarity_equals_the_whole_matrix():
    g = torch.Generator().manual_seed(0)
    n = 50
    embeds = {m: torch.randn(n, 8, generator=g) for m in MODALITIES}
    embeds["text"][10:20] = embeds["text"][10]  # identical captions: ties must count the same way
    masks = {m: torch.rand(n, generator=g) > 0.1 for m in MODALITIES}
    whole = retrieval_metrics(embeds, masks, block=n)
    for block in (1, 7, 16):
        assert retrieval_metrics(embeds, masks, block=block) == whole

"""The contrastive losses on 2 gloo ranks (features gathered with gradients)
equal the single-process loss on the full batch: the loss, each pair, and the
gradients w.r.t. the embeddings, the temperature and the SigLIP bias."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mm_models.config import ObjectiveConfig
from mm_models.objectives import CONTRASTIVE_LOSSES, MODALITIES, PAIRS, build_contrastive_loss, pair_name
from train.distributed import DistInfo, _free_port, feature_gather

pytestmark = pytest.mark.integration  # spawns processes: not in the fast tier

WORLD = 2
B, E = 8, 6  # full batch; each rank holds B // WORLD rows
KINDS = tuple(CONTRASTIVE_LOSSES)


def _cases() -> dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    embeds = {m: torch.randn(B, E, generator=g, dtype=torch.float64) for m in MODALITIES}
    ones = {m: torch.ones(B, dtype=torch.bool) for m in MODALITIES}
    mixed = {m: v.clone() for m, v in ones.items()}
    mixed["image"][[1, 5]] = False
    mixed["text"][[2, 5]] = False
    # Rank 1 (rows 4..7) holds no audio: image_audio and audio_text are absent
    # on that rank only. Row 5 holds nothing at all (a padding row).
    mixed["audio"][4:] = False
    nowhere = {m: v.clone() for m, v in ones.items()}
    nowhere["audio"][:] = False  # pairs with audio are absent on every rank
    nowhere["image"][6] = False
    return {"mixed": (embeds, mixed), "audio_nowhere": (embeds, nowhere), "full": (embeds, ones)}


def _compute(kind: str, embeds, masks, *, rank: int = 0, world: int = 1, gather=None) -> dict[str, torch.Tensor]:
    """This rank's outputs and gradients. The embeddings are one full-batch
    leaf, the same on every rank, of which each rank feeds its own rows: its
    gradient is then shaped like the single-process one and data-parallel
    averaging over ranks applies to it as to a parameter."""
    loss = build_contrastive_loss(ObjectiveConfig(contrastive=kind), gather).double()
    full = {m: e.clone().requires_grad_() for m, e in embeds.items()}
    rows = slice(rank * B // world, (rank + 1) * B // world)
    out = loss({m: e[rows] for m, e in full.items()}, {m: v[rows] for m, v in masks.items()})
    out["loss"].backward()
    result = {k: v.detach() for k, v in out.items()}
    result.update({f"grad/{m}": e.grad for m, e in full.items()})
    result.update({f"grad/{name}": p.grad for name, p in loss.named_parameters()})
    return result


def _worker(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        gather = feature_gather(DistInfo(rank=rank, world_size=WORLD))
        results = {
            f"{kind}/{case}": _compute(kind, embeds, masks, rank=rank, world=WORLD, gather=gather)
            for kind in KINDS
            for case, (embeds, masks) in _cases().items()
        }
        torch.save(results, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("contrastive_dist")
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_the_scenario_is_what_it_claims():
    _, masks = _cases()["mixed"]
    present = torch.stack([masks[m] for m in MODALITIES]).any(0)
    assert not present[5] and present.sum() == B - 1
    assert masks["audio"][: B // 2].any() and not masks["audio"][B // 2 :].any()


@pytest.mark.parametrize("case", ["mixed", "audio_nowhere", "full"])
@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_equal_one_process(per_rank, kind, case):
    embeds, masks = _cases()[case]
    single = _compute(kind, embeds, masks)
    ranks = [r[f"{kind}/{case}"] for r in per_rank]
    assert set(ranks[0]) == set(single)
    expected_params = {"grad/logit_scale"} | ({"grad/bias"} if kind == "siglip" else set())
    assert expected_params <= set(single)
    for key, value in single.items():
        # Data parallelism averages over ranks: each rank's loss is scaled so
        # that its mean is the full-batch mean, and so are its gradients.
        mean = torch.stack([r[key] for r in ranks]).mean(0)
        torch.testing.assert_close(mean, value, rtol=0, atol=1e-5, msg=f"{kind}/{case}: {key}")
    # The temperature is the same everywhere, not averaged into agreement.
    for r in ranks:
        torch.testing.assert_close(r["logit_scale"], single["logit_scale"], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_present_embeddings_only(kind):
    embeds, masks = _cases()["mixed"]
    single = _compute(kind, embeds, masks)
    for m in MODALITIES:
        grad_norm = single[f"grad/{m}"].norm(dim=1)
        assert torch.all(grad_norm[~masks[m]] == 0), m
        assert torch.all(grad_norm[masks[m]] > 0), m
    for name in ("grad/logit_scale", "grad/bias") if kind == "siglip" else ("grad/logit_scale",):
        assert torch.count_nonzero(single[name]) == 1, name
    # Pairs holding a sample on rank 0 only still have a value.
    for a, b in PAIRS:
        assert float(single[pair_name(a, b)]) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_pairs_absent_everywhere_are_zero_but_keep_the_graph(kind):
    embeds, masks = _cases()["audio_nowhere"]
    single = _compute(kind, embeds, masks)
    assert float(single["audio_text"]) == 0.0 and float(single["image_audio"]) == 0.0
    assert float(single["loss"]) == pytest.approx(float(single["image_text"]))
    assert torch.count_nonzero(single["grad/audio"]) == 0  # a zero gradient, not None


def test_unknown_contrastive_names_the_choices():
    with pytest.raises(ValueError, match=r"objective.contrastive='softmax'.*infonce.*siglip"):
        build_contrastive_loss(ObjectiveConfig(contrastive="softmax"))

"""train.predict's forwards: several batches through the model at once on a
CPU (in_order, forwards_for), rows in their order, threads restored."""

from __future__ import annotations

import threading

import pytest
import torch


def test_forwards_run_at_once_each_on_its_share_of_threads_and_rows_keep_their_order():
    """in_order with forwards=2: two batches are in the model at once (the
    first cannot finish until the second has started), each forward on half
    the threads and without autograd; outputs come back in the items' order
    although the second batch finishes first, a piece's end only after its
    batches, and torch's thread count is restored."""
    import time

    from train.predict import in_order

    before = torch.get_num_threads()
    together = threading.Barrier(2, timeout=30)
    seen, lock, active = [], threading.Lock(), [0, 0]  # now, most at once

    def forward(batch: dict) -> dict:
        with lock:
            active[0] += 1
            active[1] = max(active)
            seen.append((batch["n"], torch.get_num_threads(), torch.is_grad_enabled()))
        if batch["n"] in (0, 1):
            together.wait()  # both first batches in the model at once, or a BrokenBarrierError
            time.sleep(0.2 if batch["n"] == 0 else 0)  # the second finishes first
        with lock:
            active[0] -= 1
        return {"n": batch["n"]}

    items = [("a", {"n": 0}, None), ("a", {"n": 1}, None), ("a", None, {"x": 1})]
    items += [("b", {"n": n}, None) for n in range(2, 8)] + [("b", None, {})]
    torch.set_num_threads(4)
    try:
        got = list(in_order(iter(items), forward, forwards=2, threads=4))
        assert torch.get_num_threads() == 4
        later = []  # a thread started afterwards takes the count last set: restored too
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [4]
    finally:
        torch.set_num_threads(before)
    assert [(p, None if o is None else o["n"]) for p, _, _, o in got] == [
        (p, None if b is None else b["n"]) for p, b, _ in items
    ]
    assert [s for _, _, s, _ in got] == [s for _, _, s in items]
    assert active[1] == 2
    assert {(threads, grad) for _, threads, grad in seen} == {(2, False)}


def test_a_failed_forward_is_raised_in_order_and_ends_the_others():
    from train.predict import in_order

    before = torch.get_num_threads()
    calls = []

    def forward(batch: dict) -> dict:
        calls.append(batch["n"])
        if batch["n"] == 3:
            raise ValueError("batch 3 does not fit the model")
        return {"n": batch["n"]}

    items = iter([("a", {"n": n}, None) for n in range(50)])
    got = []
    with pytest.raises(ValueError, match="batch 3"):
        for item in in_order(items, forward, forwards=2, threads=2):
            got.append(item[3]["n"])
    assert got == [0, 1, 2] and max(calls) < 8  # no batch long after the failure ran
    assert torch.get_num_threads() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("forward")]


def test_a_consumer_that_stops_early_ends_the_forwards():
    from train.predict import in_order

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        steps = in_order(iter([("a", {"n": n}, None) for n in range(50)]), dict, forwards=2, threads=2)
        assert next(steps)[3] == {"n": 0}
        steps.close()
        assert not [t for t in threading.enumerate() if t.name.startswith("forward")]
        assert torch.get_num_threads() == 2 and torch.is_grad_enabled()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "requested,threads,device,dispatched,expected",
    [
        (0, 2, "cpu", False, 2),
        (0, 16, "cpu", False, 2),
        (0, 3, "cpu", False, 1),
        (0, 1, "cpu", False, 1),
        (0, 8, "cuda", False, 1),
        (0, 8, "cpu", True, 1),
        (4, 8, "cpu", False, 4),
        (1, 8, "cpu", False, 1),
        (2, 8, "cuda", False, "device=cuda or max_memory"),
        (2, 8, "cpu", True, "device=cuda or max_memory"),
        (3, 2, "cpu", False, "threads=2"),
        (2, 3, "cpu", False, "divides the threads"),
        (-1, 2, "cpu", False, "forwards=-1"),
    ],
)
def test_how_many_forwards_run_at_once(requested, threads, device, dispatched, expected):
    from train.predict import PredictError, forwards_for

    if isinstance(expected, str):
        with pytest.raises(PredictError, match=expected):
            forwards_for(requested, threads=threads, device=torch.device(device), dispatched=dispatched)
    else:
        assert forwards_for(requested, threads=threads, device=torch.device(device), dispatched=dispatched) == expected

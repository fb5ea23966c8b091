"""What both training loops rely on between epochs (edge_tl.train.epochs): the learning-rate
schedule, the best epoch's weights, early stopping and resuming from a checkpoint."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from edge_tl.train.epochs import Epochs  # noqa: E402


def _row(epoch: int, acc: float, loss: float = 1.0) -> dict:
    return {
        "epoch": epoch,
        "train_loss": loss,
        "train_accuracy": acc,
        "val_loss": loss,
        "val_accuracy": acc,
        "seconds": 0.1,
    }


def test_learning_rate_warms_up_linearly_then_decays_to_zero_by_a_cosine():
    e = Epochs.start(steps_per_epoch=10, epochs=5, state=None, gen=torch.Generator())
    assert (e.total, e.warmup, e.first) == (50, 6, 1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    rates = []
    for step in range(e.total):
        e.step = step
        e.set_lr(opt, [0.1])
        rates.append(opt.param_groups[0]["lr"])
    assert rates[:6] == pytest.approx([0.1 * (s + 1) / 6 for s in range(6)])
    assert rates[6] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[6:], rates[7:], strict=False))
    mid = 6 + (50 - 6) // 2
    assert rates[mid] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert rates[-1] < 0.001


def test_early_stop_after_patience_epochs_without_a_better_one_keeps_the_best_weights():
    e = Epochs.start(steps_per_epoch=1, epochs=10, state=None, gen=torch.Generator())
    accs = [0.5, 0.7, 0.7, 0.6, 0.65, 0.9]
    for epoch, acc in enumerate(accs, start=1):
        # a tie in accuracy with a higher loss is not better
        e.end(
            _row(epoch, acc, loss=float(epoch)), lambda a=acc: {"w": torch.tensor(a)}, True, 3, 10
        )
        if e.stopping(3):
            break
    assert e.stopped == 5  # epochs 3, 4, 5 were no better than epoch 2
    assert float(e.best["w"]) == pytest.approx(0.7)
    assert e.summary(True) == {
        "best_epoch": 2,
        "val_accuracy": 0.7,
        "epochs_run": 5,
        "stopped_early_at": 5,
    }


@pytest.mark.parametrize(("patience", "has_val"), [(0, True), (2, False)])
def test_no_early_stop_without_patience_or_without_a_validation_split(patience, has_val):
    e = Epochs.start(steps_per_epoch=1, epochs=6, state=None, gen=torch.Generator())
    for epoch in range(1, 7):
        e.end(_row(epoch, 0.5), lambda: {}, has_val, patience, 6)
        assert not e.stopping(patience)
    assert e.summary(has_val)["epochs_run"] == 6
    if not has_val:  # without validation the latest epoch is the one kept
        assert e.summary(has_val)["best_epoch"] == 6


def test_the_last_epoch_is_never_called_an_early_stop():
    e = Epochs.start(steps_per_epoch=1, epochs=3, state=None, gen=torch.Generator())
    for epoch, acc in enumerate([0.9, 0.5, 0.5], start=1):
        e.end(_row(epoch, acc), lambda: {}, True, 2, 3)
    assert e.stopped is None


def test_a_checkpoint_resumes_where_it_stopped():
    gen = torch.Generator().manual_seed(7)
    e = Epochs.start(steps_per_epoch=4, epochs=6, state=None, gen=gen)
    for epoch, acc in enumerate([0.4, 0.6, 0.5], start=1):
        e.step += 4
        e.end(_row(epoch, acc), lambda a=acc: {"w": torch.tensor(a)}, True, 5, 6)
    config = SimpleNamespace(epochs=6, to_dict=lambda: {"epochs": 6})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    state = e.checkpoint(config, "fp", 3, {}, opt, gen)
    expected = torch.rand(3, generator=gen)
    gen2 = torch.Generator()
    r = Epochs.start(steps_per_epoch=4, epochs=6, state=state, gen=gen2)
    assert (r.first, r.step, r.bad, r.best_key) == (4, 12, 1, (0.6, -1.0))
    assert [row["epoch"] for row in r.history] == [1, 2, 3]
    assert float(r.best["w"]) == pytest.approx(0.6)
    assert torch.equal(torch.rand(3, generator=gen2), expected)  # the same random stream
    # a run stopped early is checkpointed as finished, so resuming runs no more epochs
    r.stopped = 3
    assert r.checkpoint(config, "fp", 3, {}, opt, gen2)["epoch"] == 6

import math

import pytest

from gan_tune.stopping import COLLAPSE_AFTER_EPOCH, D_DOMINATES_EPOCHS, GanStopper


def result(epoch=1, loss_d=1.2, loss_g=0.9, d_acc=0.6, balance="balanced", coverage=10.0):
    return {"epoch": epoch, "loss_d": loss_d, "loss_g": loss_g, "d_acc": d_acc, "balance": balance,
            "coverage": coverage}


@pytest.mark.parametrize("bad", [
    {"loss_d": math.nan}, {"loss_g": math.inf}, {"loss_g": -math.inf}, {"balance": "diverged"},
    {"loss_d": math.nan, "d_acc": math.nan},
])
def test_diverged_trial_stops_with_its_reason(bad):
    stopper = GanStopper()
    assert stopper("t1", result(**bad))
    assert stopper.reasons == {"t1": "diverged"}


def test_d_dominates_needs_consecutive_epochs():
    stopper = GanStopper()
    for epoch in range(1, D_DOMINATES_EPOCHS):
        assert not stopper("t1", result(epoch=epoch, d_acc=0.97, balance="D too strong"))
    assert not stopper("t1", result(epoch=D_DOMINATES_EPOCHS, d_acc=0.9))  # the streak breaks
    for epoch in range(D_DOMINATES_EPOCHS):
        stopped = stopper("t1", result(epoch=10 + epoch, d_acc=0.99, balance="D too strong"))
    assert stopped and stopper.reasons["t1"] == "D dominates"


def test_mode_collapse_only_after_the_first_epochs():
    stopper = GanStopper()
    assert not stopper("t1", result(epoch=COLLAPSE_AFTER_EPOCH, coverage=1.0))
    assert not stopper("t1", result(epoch=COLLAPSE_AFTER_EPOCH + 1, coverage=3.0))
    assert stopper("t1", result(epoch=COLLAPSE_AFTER_EPOCH + 1, coverage=2.0))
    assert stopper.reasons["t1"] == "mode collapse"


def test_trials_are_judged_separately_and_the_study_goes_on():
    stopper = GanStopper()
    for epoch in range(1, 4):
        stopper("strong", result(epoch=epoch, d_acc=0.99))
        assert not stopper("healthy", result(epoch=epoch))
    assert stopper.reasons == {"strong": "D dominates"}
    assert not stopper.stop_all()


def test_unscored_results_never_count_as_collapse():
    stopper = GanStopper()
    unscored = result(epoch=9)
    del unscored["coverage"]
    assert not stopper("t1", unscored)

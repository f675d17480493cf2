import math

import pytest

from gan_tune.tuning.stopping import GanStopper

# The README's numbers (Searches, Stopping), not the module's constants: a changed constant must fail here.
D_DOMINATES_ACC = 0.95  # "D accuracy stays above 95 % ..."
D_DOMINATES_EPOCHS = 3  # "... for 3 epochs"
COLLAPSE_MAX_CLASSES = 2  # "covers <= 2 digit classes ..."
COLLAPSE_AFTER_EPOCH = 3  # "... after epoch 3"


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
    for epoch in range(D_DOMINATES_EPOCHS - 1):
        assert not stopper("t1", result(epoch=10 + epoch, d_acc=0.99, balance="D too strong"))
    assert stopper("t1", result(epoch=20, d_acc=0.99, balance="D too strong"))  # the third in a row
    assert stopper.reasons["t1"] == "D dominates"


def test_d_dominates_means_above_95_percent():
    at_threshold, just_above = GanStopper(), GanStopper()
    for epoch in range(1, D_DOMINATES_EPOCHS + 1):
        assert not at_threshold("t1", result(epoch=epoch, d_acc=D_DOMINATES_ACC))  # 95 % is not above 95 %
        stopped = just_above("t1", result(epoch=epoch, d_acc=D_DOMINATES_ACC + 0.001))
    assert stopped and just_above.reasons == {"t1": "D dominates"} and not at_threshold.reasons


def test_mode_collapse_only_after_the_first_epochs():
    stopper = GanStopper()
    for epoch in range(1, COLLAPSE_AFTER_EPOCH + 1):  # up to and including epoch 3, even one class is allowed
        assert not stopper("t1", result(epoch=epoch, coverage=1.0))
    assert not stopper("t1", result(epoch=COLLAPSE_AFTER_EPOCH + 1, coverage=COLLAPSE_MAX_CLASSES + 1.0))
    assert stopper("t1", result(epoch=COLLAPSE_AFTER_EPOCH + 1, coverage=float(COLLAPSE_MAX_CLASSES)))
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


def test_the_last_epoch_ends_the_trial_as_completed():
    # Tune ends the trial at max_epochs itself, so HyperBand never pauses a finished trial (see GanStopper)
    stopper = GanStopper(max_epochs=3)
    assert not stopper("t1", result(epoch=2))
    assert stopper("t1", result(epoch=3))
    assert stopper.reasons == {}  # completed: no failure reason
    assert not GanStopper()("t1", result(epoch=3))

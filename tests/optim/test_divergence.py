"""DivergenceMonitor: smoothing, the stops, the reference losses and resuming from a state dict."""

from __future__ import annotations

import json
import math
import random

import pytest

from lrsearch.optim.divergence import DivergenceMonitor


@pytest.mark.parametrize("reference", ["min", "first"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_stops_and_is_not_recorded(reference, bad):
    monitor = DivergenceMonitor(reference=reference)
    for loss in (2.0, 1.9, 1.8):
        assert not monitor.update(loss)
    state, smoothed = monitor.state_dict(), monitor.smoothed
    assert monitor.update(bad)
    assert monitor.smoothed == smoothed and monitor.state_dict() == state
    assert monitor.num_losses == 3
    assert DivergenceMonitor(reference=reference).update(bad)  # also as the very first loss


def test_spike_above_factor_times_the_lowest_smoothed_loss_stops():
    monitor = DivergenceMonitor(factor=4.0, smooth=1.0)  # no smoothing: the loss is the smoothed loss
    for loss in (3.0, 2.0, 1.0, 0.5, 1.9, 2.0):  # 2.0 == 4 x 0.5 is not above it
        assert not monitor.update(loss)
    assert monitor.reference_loss == 0.5
    assert monitor.update(2.01)


def test_first_reference_is_the_first_loss_and_ignores_later_lows():
    monitor = DivergenceMonitor(factor=4.0, smooth=1.0, reference="first")
    for loss in (1.0, 0.1, 0.05, 3.9, 4.0):  # 80 x the low point: normal for a trial
        assert not monitor.update(loss)
    assert monitor.reference_loss == 1.0
    assert monitor.update(4.01)


def test_smoothing_delays_the_stop_on_a_single_outlier():
    monitor = DivergenceMonitor(factor=4.0, smooth=0.05)
    for _ in range(50):
        assert not monitor.update(1.0)
    assert not monitor.update(20.0)  # one 20x outlier lifts the smoothed loss to about 2
    avg = 0.95 * (1 - 0.95**50) + 0.05 * 20.0  # the raw EMA of 50 ones then 20
    assert monitor.smoothed == pytest.approx(avg / (1 - 0.95**51))
    assert monitor.smoothed < 4.0 * monitor.reference_loss
    for _ in range(10):
        if monitor.update(20.0):
            break
    else:
        pytest.fail("a sustained 20x loss never stopped the monitor")


@pytest.mark.parametrize("reference", ["min", "first"])
def test_noisy_curve_that_does_not_diverge_never_stops(reference):
    rng = random.Random(0)
    monitor = DivergenceMonitor(reference=reference)
    # a training loss falling from 2.3 to ~0.2 with +-60 % multiplicative noise and rare 5x spikes
    for step in range(2000):
        loss = (0.2 + 2.1 * math.exp(-step / 300)) * rng.uniform(0.4, 1.6)
        if step % 97 == 0:
            loss *= 5
        assert not monitor.update(loss), (step, loss, monitor.smoothed, monitor.reference_loss)


def test_bias_corrected_ema_values():
    monitor = DivergenceMonitor(smooth=0.3, factor=100.0)
    assert math.isnan(monitor.smoothed) and monitor.reference_loss is None
    losses = [2.0, 1.0, 4.0, 0.5]
    avg = 0.0
    for n, loss in enumerate(losses, start=1):
        monitor.update(loss)
        avg = 0.7 * avg + 0.3 * loss
        assert monitor.smoothed == pytest.approx(avg / (1 - 0.7**n))
    # the first smoothed value is the loss itself: no pull toward 0
    first = DivergenceMonitor(smooth=0.3)
    first.update(2.0)
    assert first.smoothed == pytest.approx(2.0)
    # explicit numbers: (0.3 * 0.7 * 2 + 0.3 * 1) / (1 - 0.49) = 0.72 / 0.51
    second = DivergenceMonitor(smooth=0.3)
    second.update(2.0)
    second.update(1.0)
    assert second.smoothed == pytest.approx(0.72 / 0.51)


def test_smooth_one_disables_smoothing():
    monitor = DivergenceMonitor(smooth=1.0, factor=100.0)
    for loss in (3.0, 1.0, 7.5):
        monitor.update(loss)
        assert monitor.smoothed == loss


@pytest.mark.parametrize("reference", ["min", "first"])
def test_state_dict_round_trip_continues_identically(reference):
    rng = random.Random(1)
    losses = [2.0 * math.exp(-i / 40) * rng.uniform(0.7, 1.3) for i in range(150)]
    losses += [3.0 * 1.1**i for i in range(60)]
    whole = DivergenceMonitor(factor=3.0, smooth=0.1, reference=reference)
    whole_out = [(whole.update(x), whole.smoothed, whole.reference_loss) for x in losses]

    first = DivergenceMonitor(factor=3.0, smooth=0.1, reference=reference)
    for x in losses[:100]:
        first.update(x)
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))  # plain, strict JSON
    resumed = DivergenceMonitor(factor=3.0, smooth=0.1, reference=reference)
    resumed.load_state_dict(state)
    assert resumed.num_losses == 100
    resumed_out = [(resumed.update(x), resumed.smoothed, resumed.reference_loss) for x in losses[100:]]
    assert resumed_out == whole_out[100:]  # exactly, not approximately
    assert any(stop for stop, _, _ in resumed_out)  # the resumed part does reach divergence


def test_state_dict_before_any_loss_round_trips():
    state = DivergenceMonitor().state_dict()
    monitor = DivergenceMonitor()
    monitor.load_state_dict(state)
    assert monitor.reference_loss is None and math.isnan(monitor.smoothed)
    assert not monitor.update(1.0) and monitor.smoothed == pytest.approx(1.0)


def test_load_state_dict_names_missing_keys():
    with pytest.raises(ValueError, match="missing count, reference_loss"):
        DivergenceMonitor().load_state_dict({"avg": 1.0})


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"factor": 1.0}, "factor=1.0 is not allowed; factor must be a finite number > 1"),
        ({"factor": math.inf}, "factor=inf"),
        ({"factor": "4"}, "factor='4'"),
        ({"smooth": 0}, "smooth=0 is not allowed; smooth must be a number with 0 < smooth <= 1"),
        ({"smooth": 1.5}, "smooth=1.5"),
        ({"smooth": math.nan}, "smooth=nan"),
        ({"reference": "best"}, "reference='best' is not allowed; reference must be one of 'min', 'first'"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        DivergenceMonitor(**kwargs)
    assert fragment in str(info.value)

"""``lrsearch demo``: the embedded job fits its own trials' horizon. The demo itself is not run here
(minutes on 2 cores; with two trials at a time TPE's suggestions after its startup trials depend on
which trial finishes first, so a whole demo is not reproducible to the trial).
"""

from __future__ import annotations

import pytest

from lrsearch.demo import demo_job


@pytest.mark.parametrize("quick", [True, False])
def test_demo_range_test_fits_the_trials_horizon(quick):
    job = demo_job(quick=quick)
    t, s, rt = job.task, job.search, job.range_test
    steps_per_epoch = t.num_train // t.batch_size
    # the first ASHA rung comes after >= 48 optimizer steps: at 1e-4 and batch 8, 48 steps of AdamW
    # learn past the majority class, 24 do not (measured on this task)
    assert s.grace_period * steps_per_epoch >= 48
    # the bounds never go below the sweep's first LR: no trial gets a max_lr its horizon cannot use
    assert rt.start_lr >= 1e-4
    # the sweep sees at most as many batches as one trial, in the trials' own batches: a larger
    # batch holds a higher LR (accumulating 2 gave bounds up to 2.5e-3, where a trial collapsed)
    assert rt.num_steps * (rt.accumulation_steps or 1) <= s.max_epochs * steps_per_epoch
    assert (rt.accumulation_steps or job.train.gradient_accumulation_steps) == 1


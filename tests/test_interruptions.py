"""The one rule by which a run stops early (distributed/interruptions.py): what the ranks agree on at a log
interval, and the exit status that follows. The signals themselves are sent to real processes in test_survival.py
(local) and test_ray.py (`ray job stop`); hangs in test_hangs.py."""

from __future__ import annotations

import signal

from dcgan_dist.distributed.interruptions import (Interrupts, Notice, Preempted, Stopped, StopRequest,
                                                  exit_status)

NOTICE = Notice("node abc reclaimed in 90 s", deadline=0.0, nodes=frozenset({"abc"}))


def test_a_stop_asked_on_any_rank_is_the_same_stop_on_every_rank_and_wins_over_a_notice():
    asked, calm = Interrupts(StopRequest()), Interrupts(StopRequest(), preemption=lambda: NOTICE)
    asked.stop.request(signal.SIGTERM, "a test")
    total = asked.request() + calm.request()  # the interval's reduction: one rank asked
    for ranks in (asked, calm):
        got = ranks.at_interval(float(total), 1.0, last=False)
        assert got is not None and got.signum == signal.SIGTERM and got.notice is None
        err = got.error(4096, "ckpt-000000004096.pt")
        assert isinstance(err, Stopped) and exit_status(err) == 128 + signal.SIGTERM
        assert "4096 images" in str(err) and "rerun the same command" in str(err)


def test_the_drivers_signal_reaches_the_rank_through_its_probe():
    rank = Interrupts(StopRequest(), stop_probe=lambda: int(signal.SIGINT))
    assert rank.request() == signal.SIGINT and rank.asked_here()


def test_a_notice_is_asked_for_only_when_no_stop_is_and_never_at_the_last_interval():
    asked = []
    ranks = Interrupts(StopRequest(), preemption=lambda: asked.append(1) or NOTICE)
    got = ranks.at_interval(0.0, 0.0, last=False)
    assert got.notice is NOTICE and isinstance(got.error(512, "x"), Preempted)
    assert ranks.at_interval(0.0, 0.0, last=True) is None and len(asked) == 1
    assert Interrupts(StopRequest()).at_interval(0.0, 0.0, last=False) is None


def test_a_closed_terminal_exits_as_a_hangup():
    assert exit_status(Stopped(signal.SIGHUP, "x")) == 129

"""ksmd's sleep in jiffies: ``msecs_to_jiffies``, ``schedule_timeout`` and the timer wheel.

ksmd sleeps between batches with a timeout of ``msecs_to_jiffies(sleep_millisecs)``
jiffies (``wait_event_freezable_timeout`` on ``ksm_iter_wait``; a timeout of 0
does not sleep at all).  ``schedule_timeout`` arms a timer that expires at
``jiffies + timeout``, and the timer wheel (``kernel/time/timer.c``,
``calc_wheel_index``) files it in a bucket whose expiry is rounded *up* with
the granularity of its level, so that it never fires early: on level 0
(timeouts under 63 jiffies) one jiffy later than asked, on level *n*
(granularity 8**n jiffies) at the next multiple of the granularity above the
expiry.  The timer fires on the tick that starts that jiffy, and ksmd runs
once the scheduler gets to it.  So the period of ksmd depends on where in
its jiffy the sleep started, and with HZ=250 and the default 20 ms it is
24 ms (5 jiffies asked, the 6th tick), not 20 ms: measured on this
machine's kernel, the median gap between batches was 8, 12, 16, 24, 320
and 1024 ms for ``sleep_millisecs`` = 1, 5, 10, 20, 300 and 1000
(docs/cost-model.md).

Model choices: the virtual machine's jiffies count from 0 at virtual time 0
(the real ``INITIAL_JIFFIES`` only shifts where the coarse levels' multiples
fall), and the timer base's clock is taken to be the current jiffy.
"""

from __future__ import annotations

import math
from typing import Final

NSEC_PER_SEC: Final = 1_000_000_000
MSEC_PER_SEC: Final = 1000
LONG_MAX: Final = 2**63 - 1
MAX_JIFFY_OFFSET: Final = ((LONG_MAX >> 1) - 1)
"""``MAX_JIFFY_OFFSET``: what ``msecs_to_jiffies`` returns for a negative (as int) or huge value."""

_LVL_CLK_SHIFT: Final = 3
_LVL_BITS: Final = 6
_GOLDEN: Final = (math.sqrt(5) - 1) / 2
_SILVER: Final = math.sqrt(2) - 1


def tick_nsec(hz: int) -> int:
    """``TICK_NSEC``: nanoseconds per jiffy, rounded as the kernel rounds it."""
    return (NSEC_PER_SEC + hz // 2) // hz


def msecs_to_jiffies(ms: int, hz: int) -> int:
    """``msecs_to_jiffies`` for an ``unsigned int`` of milliseconds: rounded up, never down.

    A value that is negative as an ``int`` (2**31 and above) gives
    ``MAX_JIFFY_OFFSET``, as in the kernel.
    """
    if ms >= 2**31:
        return MAX_JIFFY_OFFSET
    if MSEC_PER_SEC % hz == 0:
        per = MSEC_PER_SEC // hz
        return (ms + per - 1) // per
    if hz % MSEC_PER_SEC == 0:
        return ms * (hz // MSEC_PER_SEC)
    return -(-ms * hz // MSEC_PER_SEC)  # the kernel's MUL32/ADJ32 pair computes this ceiling


def _lvl_start(n: int) -> int:
    return ((1 << _LVL_BITS) - 1) << ((n - 1) * _LVL_CLK_SHIFT)


def timer_fire_jiffy(expires: int, clk: int, hz: int) -> int:
    """The jiffy whose tick runs a timer armed at *clk* to expire at *expires*.

    ``calc_wheel_index``'s ``bucket_expiry``: the level is chosen by how far
    ahead the timer is; the expiry is rounded up with that level's
    granularity (strictly above it, so level 0 adds one jiffy), and a timer
    beyond the wheel's range is cut to its capacity.
    """
    depth = 9 if hz > 100 else 8
    delta = expires - clk
    lvl = 0
    while lvl < depth - 1 and delta >= _lvl_start(lvl + 1):
        lvl += 1
    if lvl == depth - 1 and delta >= _lvl_start(depth):
        expires = clk + _lvl_start(depth) - (1 << ((depth - 1) * _LVL_CLK_SHIFT))
    shift = lvl * _LVL_CLK_SHIFT
    return ((expires >> shift) + 1) << shift


def sleep_end_ns(start_ns: int, sleep_ms: int, hz: int) -> int:
    """When a sleep of *sleep_ms* that starts at *start_ns* ends: the tick that fires its timer.

    ``sleep_ms`` = 0 does not sleep (the wait returns at once).
    """
    if sleep_ms == 0:
        return start_ns
    tick = tick_nsec(hz)
    now = start_ns // tick
    return timer_fire_jiffy(now + msecs_to_jiffies(sleep_ms, hz), now, hz) * tick


def wake_delay_ns(k: int, mean_ns: float) -> int:
    """The scheduling delay of ksmd's *k*-th wake-up by its timer (k from 0).

    Model choice: exponentially distributed with mean *mean_ns*, taken at the
    quantiles of the golden-ratio sequence ``frac((k + 1) * 0.618...)`` rather
    than drawn at random, so that virtual time stays reproducible while the
    delays have the fitted mean and spread.
    """
    if mean_ns <= 0:
        return 0
    u = ((k + 1) * _GOLDEN) % 1.0
    return round(-mean_ns * math.log1p(-u))


def late_wake(k: int, fraction: float) -> bool:
    """Whether ksmd's *k*-th timer wake-up runs only after the next tick.

    Model choice: measured on this machine (a VM sharing 2 vCPUs), a share
    of ksmd's wake-ups come one jiffy late as a whole (the timer's softirq
    deferred, the vCPU not running), giving periods of 7 jiffies instead of 6
    for sleep_millisecs=20 (docs/cost-model.md).  Which wake-ups are late
    follows the sequence ``frac((k + 1) * (sqrt(2) - 1)) < fraction``, so the
    share is *fraction* over any stretch of wake-ups, reproducibly.
    """
    return ((k + 1) * _SILVER) % 1.0 < fraction


__all__ = ["MAX_JIFFY_OFFSET", "late_wake", "msecs_to_jiffies", "sleep_end_ns", "tick_nsec",
           "timer_fire_jiffy", "wake_delay_ns"]

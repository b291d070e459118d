"""A model of ksmtuned, Red Hat's KSM tuning daemon, as a controller of the scenario runner.

ksmtuned is a shell script (``/usr/sbin/ksmtuned``, settings in
``/etc/ksmtuned.conf``); our account of it, with the sources, is in
docs/tune.md ("ksmtuned, as modelled").  In short, all sizes in KiB as it
reads them from ``/proc/meminfo``:

* at start: ``thres = max(total * KSM_THRES_COEF / 100, KSM_THRES_CONST)``
  and ``sleep = max(KSM_SLEEP_MSEC * 16 GiB / total, 10)`` ms (integer
  division: a 16 GiB host sleeps ``KSM_SLEEP_MSEC``, a smaller one longer);
  ``npages`` starts at 0;
* every ``KSM_MONITOR_INTERVAL`` seconds (and at once when libvirt signals
  that a guest started or stopped) it *adjusts*: if ``committed + thres <
  total`` and ``free > thres``, ksmd is stopped (``run=0``); otherwise
  ``npages`` grows by ``KSM_NPAGES_BOOST`` if ``free < thres``, else by
  ``KSM_NPAGES_DECAY`` (negative), clamped to ``[KSM_NPAGES_MIN,
  KSM_NPAGES_MAX]``, and it writes ``pages_to_scan = npages``,
  ``sleep_millisecs = sleep`` and ``run = 1``.

``committed`` is the resident memory of the guests (the RSS of the qemu
processes), ``free`` is ``MemFree + Buffers + Cached``.  In the model the
guests are the scenario's processes and the host is
:class:`KsmtunedHost`: ``total`` is the host's memory, its only user the
workload, so ``committed`` is the workload's resident pages (a page mapped
to the kernel's zero page, ``ksm_zero_pages``, is not resident) and ``free``
is ``total`` less the physical pages the workload uses (its resident pages
less ``pages_sharing``: those mappings share a KSM page).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ksmlab.constants import PAGE_SIZE
from ksmlab.scenario.control import ControlAction, ControlView
from ksmlab.scenario.units import NS_PER_S

__all__ = ["KSMTUNED_DEFAULTS", "Adjustment", "KsmtunedConfig", "KsmtunedController",
           "KsmtunedPolicy"]

_PAGE_KB = PAGE_SIZE // 1024
_SIXTEEN_GIB_KB = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class KsmtunedConfig:
    """ksmtuned's settings (``/etc/ksmtuned.conf``); the defaults are the script's own."""

    monitor_interval_s: int = 60
    sleep_msec: int = 10
    npages_boost: int = 300
    npages_decay: int = -50
    npages_min: int = 64
    npages_max: int = 1250
    thres_coef: int = 20
    thres_const: int = 2048


KSMTUNED_DEFAULTS = KsmtunedConfig()


@dataclass(frozen=True, slots=True)
class Adjustment:
    """One ``adjust`` of ksmtuned: stop ksmd, or start it with *npages* and *sleep_ms*."""

    action: Literal["stop", "start"]
    npages: int
    sleep_ms: int
    reason: str


@dataclass
class KsmtunedPolicy:
    """ksmtuned's arithmetic, on a host of *total_kb* KiB (see the module doc)."""

    total_kb: int
    config: KsmtunedConfig = KSMTUNED_DEFAULTS
    npages: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.total_kb, bool) or not isinstance(self.total_kb, int) or self.total_kb <= 0:
            msg = f"total_kb must be a number of KiB > 0, got {self.total_kb!r}"
            raise ValueError(msg)

    @property
    def thres_kb(self) -> int:
        """The free-memory threshold: a share of the host's memory, at least ``thres_const``."""
        c = self.config
        return max(self.total_kb * c.thres_coef // 100, c.thres_const)

    @property
    def sleep_ms(self) -> int:
        """``sleep_millisecs`` as ksmtuned sets it: scaled to a 16 GiB host, at least 10."""
        return max(self.config.sleep_msec * _SIXTEEN_GIB_KB // self.total_kb, 10)

    def _increase(self, delta: int) -> int:
        c = self.config
        return min(max(self.npages + delta, c.npages_min), c.npages_max)

    def adjust(self, free_kb: int, committed_kb: int) -> Adjustment:
        """One adjustment from the host's free and committed memory (KiB)."""
        thres, total = self.thres_kb, self.total_kb
        if committed_kb + thres < total and free_kb > thres:  # npages is kept as it was
            return Adjustment("stop", self.npages, self.sleep_ms,
                              f"committed {committed_kb} + thres {thres} < total {total} "
                              f"and free {free_kb} > thres: stop")
        if free_kb < thres:
            self.npages = self._increase(self.config.npages_boost)
            why = f"free {free_kb} < thres {thres}: boost"
        else:
            self.npages = self._increase(self.config.npages_decay)
            why = f"free {free_kb} >= thres {thres}: decay"
        return Adjustment("start", self.npages, self.sleep_ms, why)


@dataclass
class KsmtunedController:
    """ksmtuned as a controller of a run (:class:`~ksmlab.scenario.control.Controller`).

    It adjusts at the start (libvirt signals ksmtuned as the guests start) and
    every ``monitor_interval_s`` after that; :attr:`log` keeps every decision.
    """

    host_bytes: int
    config: KsmtunedConfig = KSMTUNED_DEFAULTS
    name: str = "ksmtuned"
    log: list[tuple[float, Adjustment]] = field(default_factory=list)
    policy: KsmtunedPolicy = field(init=False)

    def __post_init__(self) -> None:
        self.policy = KsmtunedPolicy(self.host_bytes // 1024, self.config)

    def first_ns(self) -> int:
        """At the start."""
        return 0

    def memory_kb(self, view: ControlView) -> tuple[int, int]:
        """(free, committed) in KiB on the modelled host (see the module doc)."""
        committed = (view.resident_pages - view.counters.get("ksm_zero_pages", 0)) * _PAGE_KB
        used = committed - view.counters.get("pages_sharing", 0) * _PAGE_KB
        return max(self.policy.total_kb - used, 0), committed

    def act(self, view: ControlView) -> ControlAction:
        """One ``adjust``: the knobs it writes (``KSMCTL stop`` or ``start``)."""
        free, committed = self.memory_kb(view)
        adj = self.policy.adjust(free, committed)
        self.log.append((view.now_ns / NS_PER_S, adj))
        writes = ((("run", "0"),) if adj.action == "stop" else
                  (("pages_to_scan", str(adj.npages)), ("sleep_millisecs", str(adj.sleep_ms)),
                   ("run", "1")))
        return ControlAction(writes, view.now_ns + self.config.monitor_interval_s * NS_PER_S,
                             adj.reason)

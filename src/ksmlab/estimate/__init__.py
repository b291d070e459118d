"""Estimates from snapshots: what KSM would save on live processes, how fast, and at what CPU cost.

``ksmlab estimate FILE`` (docs/estimate.md) reads a snapshot written by
``ksmlab snapshot`` and gives the static bound (duplicate and zero pages),
the dynamic prediction (the snapshot's pages loaded into a model engine,
ksmd run in virtual time with the host's knobs or others), and the exposure
across security domains.

Modules: :mod:`~ksmlab.estimate.plan` (the pages to load),
:mod:`~ksmlab.estimate.static` (the static bound), :mod:`~ksmlab.estimate.exposure`,
:mod:`~ksmlab.estimate.load` (the engines), :mod:`~ksmlab.estimate.simulate`
(ksmd's run), :mod:`~ksmlab.estimate.core` (all of it), :mod:`~ksmlab.estimate.report`
(the JSON document and the reports), :mod:`~ksmlab.estimate.command` (the subcommand).
"""

from ksmlab.estimate.core import Estimate, resolve_knobs, run_estimate
from ksmlab.estimate.exposure import DomainPair, Exposure, exposure
from ksmlab.estimate.plan import LoadPlan, load_plan, rewrite_rates
from ksmlab.estimate.static import Bound, GroupBound, bound

__all__ = ["Bound", "DomainPair", "Estimate", "Exposure", "GroupBound", "LoadPlan", "bound",
           "exposure", "load_plan", "resolve_knobs", "rewrite_rates", "run_estimate"]

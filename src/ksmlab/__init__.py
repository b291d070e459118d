"""ksmlab: a faithful, deterministic model of Linux KSM, with the real kernel as oracle.

>>> from ksmlab import SimKernel, MADV_MERGEABLE, PAGE_SIZE
>>> k = SimKernel()
>>> p = k.spawn()
>>> a = p.mmap(10 * PAGE_SIZE)
>>> p.write(a, b"*" * 10 * PAGE_SIZE)
>>> p.madvise(a, 10 * PAGE_SIZE, MADV_MERGEABLE)
>>> k.sysfs["run"] = "1"
>>> k.wait_full_scans(2)
>>> k.sysfs["pages_shared"], k.sysfs["pages_sharing"]
('1', '9')

Scenarios from Python (docs/python.md): ``ksmlab.load_scenario(path)``,
``ksmlab.run(scenario, backend="auto")`` and the :class:`~ksmlab.notebook.Result`.
"""

from typing import TYPE_CHECKING

from ksmlab.api import Kernel, KsmStat, Process, SmapsEntry
from ksmlab.constants import *  # noqa: F403  (every kernel constant, by design)
from ksmlab.constants import PAGE_SIZE
from ksmlab.errors import (
    KernelError,
    KsmSimError,
    ModelInvariantError,
    NotModelledError,
    ProcessExitedError,
    ScanStalledError,
)
from ksmlab.kernel import SimKernel, SimProcess
from ksmlab.tracing import TraceEvent

if TYPE_CHECKING:  # imported on first use (below): the scenario machinery is not needed otherwise
    from ksmlab.notebook import Result, Sample, load_scenario, run
    from ksmlab.scenario.preflight import WontFitError

_NOTEBOOK = ("Result", "Sample", "load_scenario", "run")


def __getattr__(name: str) -> object:
    # LinuxKernel is imported lazily: it is only needed to drive the real kernel.
    if name in ("LinuxKernel", "KsmUnavailableError"):
        from ksmlab.backends import linux

        return getattr(linux, name)
    if name in _NOTEBOOK:
        from ksmlab import notebook

        return getattr(notebook, name)
    if name == "WontFitError":
        from ksmlab.scenario import preflight

        return preflight.WontFitError
    msg = f"module 'ksmlab' has no attribute {name!r}"
    raise AttributeError(msg)


from ksmlab import constants as _constants  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "PAGE_SIZE",
    "Kernel",
    "KernelError",
    "KsmSimError",
    "KsmStat",
    "ModelInvariantError",
    "NotModelledError",
    "Process",
    "ProcessExitedError",
    "Result",
    "Sample",
    "ScanStalledError",
    "SimKernel",
    "SimProcess",
    "SmapsEntry",
    "TraceEvent",
    "WontFitError",
    "load_scenario",
    "run",
]
__all__ += [name for name in vars(_constants) if name.isupper()]

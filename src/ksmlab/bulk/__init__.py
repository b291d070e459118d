"""The bulk engine: ksmd over columnar (numpy) state, for hosts too big for SimKernel.

See :mod:`ksmlab.bulk.kernel` for what it models and
:mod:`ksmlab.bulk.engine` for its model choices.
"""

from ksmlab.bulk.content import ContentTable
from ksmlab.bulk.kernel import BulkKernel, BulkProcess

__all__ = ["BulkKernel", "BulkProcess", "ContentTable"]

"""The bulk engine's vectorised batch path (placeholder: per-page path)."""

from __future__ import annotations

from ksmlab.bulk.engine import BulkKsm


class VectorKsm(BulkKsm):
    """BulkKsm whose walk handles runs of pages with numpy."""

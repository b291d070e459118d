# SPDX-License-Identifier: GPL-2.0-only
"""Every exception ksmlab defines derives from its one base class, ``KsmSimError``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import ksmlab
from ksmlab.errors import KsmSimError


def test_every_exception_class_derives_from_the_base() -> None:
    found = []
    for info in pkgutil.walk_packages(ksmlab.__path__, "ksmlab."):
        if info.name == "ksmlab.__main__":
            continue  # runs the command line when imported
        module = importlib.import_module(info.name)
        for _name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, BaseException):
                found.append(cls)
    assert len(found) >= 10, "the walk missed the package's modules"
    strays = sorted(f"{c.__module__}.{c.__qualname__}" for c in found if not issubclass(c, KsmSimError))
    assert strays == [], f"exceptions not derived from KsmSimError: {strays}"

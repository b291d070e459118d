"""Backends that run the :mod:`ksmlab.api` interface against something other than the model.

:mod:`ksmlab.backends.linux` drives the real kernel's KSM (root only); import
:class:`~ksmlab.backends.linux.LinuxKernel` from there.  Nothing is imported
here so that ``import ksmlab`` never touches ``/sys`` or needs a C compiler.
"""

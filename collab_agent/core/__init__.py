"""The step loop and its pieces: the reasoner, the session a policy sees, the trace it writes,
the reasoning formats with their step splitters, the reasoning settings (`ReasoningConfig`), the
context-length check and what of a streamed step may be shown.

This package's ``__init__`` imports nothing, so the plain layers in it (``core.trace``,
``core.formats``, ``core.config``) load without the backends that ``core.reasoner`` needs.
"""

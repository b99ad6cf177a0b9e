"""Deprecated home of the shared command-line options: they are `collab_agent.cli.options`."""

from collab_agent.cli.options import *  # noqa: F403
from collab_agent.cli.options import __all__  # noqa: F401

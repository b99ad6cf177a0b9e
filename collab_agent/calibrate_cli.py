"""Deprecated home of ``collab-agent calibrate``: the command is `collab_agent.cli.calibrate`."""

from collab_agent.cli.calibrate import calibrate_command, register

__all__ = ["calibrate_command", "register"]

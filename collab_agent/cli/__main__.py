"""``python -m collab_agent.cli``: the ``collab-agent`` command."""

from collab_agent.cli import main

main()

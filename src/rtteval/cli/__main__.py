"""``python -m rtteval.cli``: the same entry point as the ``rtteval`` command."""

from rtteval.cli.main import main

main()

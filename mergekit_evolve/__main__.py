"""``python -m mergekit_evolve CONFIG``: always this project, whichever package owns
the ``mergekit-evolve`` script (mergekit ships a deprecated one of the same name)."""

from .cli import main

main(prog_name="python -m mergekit_evolve")

"""Sub-commands of the ``memcontrol`` command line (see ``memcontrol.cli``)."""

"""Serving a snapshot over NBD through nbdkit: the plugin nbdkit runs
(`nbdkit_plugin.py`) and what it reports as holes (`allocation.py`)."""

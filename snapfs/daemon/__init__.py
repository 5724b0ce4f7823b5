"""The daemon: the live process of a live disk (`live.py`), the processes
that serve its snapshots (`snapshot_server.py`), how the live process runs
each snapshot (`snapshot.py`), its control socket (`control_server.py`), its
state for bringing snapshots back after a crash (`state.py`) and its logs."""

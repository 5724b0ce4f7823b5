"""The `snapfs` command: options in `main.py`, the commands in `commands.py`,
starting a live disk's daemon in `start.py`, the checks of paths and images
in `checks.py`, talking to a running daemon in `client.py`."""

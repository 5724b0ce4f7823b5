"""The backup engine: the copy map, copy-before-write, the background job,
the backup target and the snapshot's read path."""

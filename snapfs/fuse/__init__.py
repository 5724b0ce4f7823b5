"""The FUSE file systems: thin handlers over the image and backup layers."""

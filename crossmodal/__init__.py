"""Crossmodal Search tooling: the local stack launcher, the offline demo model and the CLI."""

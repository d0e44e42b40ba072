"""Adapters that make hyperowl a model of other tools (each needs its own extra, e.g. ``hyperowl[lmms]``)."""

"""medtune: a local medical specialist out of an open model."""

__version__ = "0.1.0"

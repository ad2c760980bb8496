"""slidr: real-time detection of robotic ad clicks; this package is the command line and the
demo."""

__version__ = "0.1.0"

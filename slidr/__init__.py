"""slidr: real-time detection of robotic ad clicks (command line, settings, simulator)."""

__version__ = "0.1.0"

"""Subcommands of the stream and the model lifecycle, registered into ``slidr.cli``."""

from __future__ import annotations

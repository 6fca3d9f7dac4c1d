"""Runners evaluate a generation's candidates: in this process or on Ray workers."""

from .base import Runner
from .serial import SerialRunner

__all__ = ["Runner", "SerialRunner"]

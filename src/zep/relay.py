"""Chooses the relay implementation (placeholder until the relay work lands)."""

from zep._relay_py import relay

IMPLEMENTATION = "python"
WHY = "pure-Python relay"

__all__ = ["relay", "IMPLEMENTATION", "WHY"]

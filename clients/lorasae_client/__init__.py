"""Client for the lorasae feature server: httpx + pydantic only, no torch."""

__version__ = "0.1.0"

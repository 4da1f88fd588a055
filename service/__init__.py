"""The lorasae feature server (FastAPI)."""

"""Shared test fixtures of the metrics area (registered in conftest.py)."""

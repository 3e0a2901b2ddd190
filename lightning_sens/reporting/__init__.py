"""Turning FI results into logged metrics, tables and figures (no Lightning imports here)."""

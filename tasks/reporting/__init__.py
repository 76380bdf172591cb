"""Reporting: plots, Prefect artifacts, live progress and the run summary."""

"""Runnable examples of taskprocessor (a package so that workers can import them)."""

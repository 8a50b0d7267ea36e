"""Resilience policies as pure maths on timestamps: retries, rate limits, adaptive limits, breakers.

Nothing here reads a clock or awaits: every method takes ``now``. The engine wraps them
as admission stages (`taskprocessor.engine.stages`).
"""

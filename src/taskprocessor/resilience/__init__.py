"""Resilience policies as pure maths on timestamps: retries (and, later, limiters and breakers)."""

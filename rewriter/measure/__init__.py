"""Measure: latency, isolated memory probe, static costs, and the acceptance policy."""

"""Tune: find each Conv/MatMul site, time its forms in isolation, decide, cache the decision."""

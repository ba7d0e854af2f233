"""Evaluation protocols (the full harness, ``lofit-eval``, builds on these scorers)."""

"""Evaluation: metrics, generation harnesses and reports for every stage checkpoint."""

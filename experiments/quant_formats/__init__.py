"""Quantisation formats experiment."""

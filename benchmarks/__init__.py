"""Measured benchmark tables (results/*.json) and the script that renders them
into BENCHMARKS.md (``python -m benchmarks.render``)."""

"""Aux-loss-free MoE load balancing on the CPU MoE config (see run.py)."""

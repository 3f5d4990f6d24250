"""Kernel fingerprints (pallas_kernels.fingerprint) on CPU: stable for the same
kernels, different where a kernel changes, blind to everything else."""
import dataclasses

from pallas_kernels.attention import tuning
from pallas_kernels.fingerprint import _attention_case, fingerprints


def test_fingerprints_follow_the_kernels_only():
    two_kernels = dataclasses.replace(tuning.DEFAULTS[64], backward="two_kernels")
    fn, args = _attention_case(130, 130, 2, 1, 64, causal=True, block_sizes=two_kernels)
    base = fingerprints(fn, *args)
    assert len(base) == 3 and len(set(base)) == 3  # forward, dQ, dK/dV
    assert fingerprints(fn, *args) == base
    # A new function object with the same kernels (other Python source lines).
    again, args2 = _attention_case(130, 130, 2, 1, 64, causal=True, block_sizes=two_kernels)
    assert fingerprints(again, *args2) == base
    # Forward without ping-pong: only the forward kernel changes.
    no_pingpong = dataclasses.replace(two_kernels, pingpong=False)
    fn3, args3 = _attention_case(130, 130, 2, 1, 64, causal=True, block_sizes=no_pingpong)
    changed = fingerprints(fn3, *args3)
    assert changed[0] != base[0] and changed[1:] == base[1:]

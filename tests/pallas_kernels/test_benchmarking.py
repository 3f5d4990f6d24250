"""The benchmark helpers' device timing: kernel launches read from a profiler trace."""
import types

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import benchmarking


def _profile(planes):
    """A stand-in for jax.profiler.ProfileData: {plane: {line: [(name, ns)]}}."""
    return types.SimpleNamespace(planes=[
        types.SimpleNamespace(name=plane, lines=[
            types.SimpleNamespace(name=line, events=[
                types.SimpleNamespace(name=n, duration_ns=ns) for n, ns in events])
            for line, events in lines.items()])
        for plane, lines in planes.items()])


def test_kernel_seconds_reads_gpu_stream_lines_only():
    profile = _profile({
        "/host:CPU": {"python": [("dispatch", 9000.0)]},
        "/device:GPU:0": {
            "Stream #13(Compute)": [("int4_kernel", 16640.0), ("loop_add_fusion", 1000.0),
                                    ("int4_kernel", 16000.0)],
            "XLA Ops": [("custom-call", 17000.0)],  # the same launches again, per HLO op
        },
        "/device:GPU:1": {"Stream #2": [("int4_kernel", 15000.0)]},
    })
    got = benchmarking.kernel_seconds(profile)
    assert sorted(got) == ["int4_kernel", "loop_add_fusion"]
    assert got["int4_kernel"] == pytest.approx([16.64e-6, 16e-6, 15e-6])
    assert got["loop_add_fusion"] == pytest.approx([1e-6])


def test_kernel_seconds_names_the_lines_when_no_kernel_is_found():
    profile = _profile({"/device:GPU:0": {"XLA Ops": [("fusion", 5.0)]}})
    with pytest.raises(RuntimeError, match=r"no GPU kernel launches.*XLA Ops"):
        benchmarking.kernel_seconds(profile)


def test_device_kernel_seconds_traces_a_real_call():
    # A real trace is taken and read. On a GPU it holds the call's kernels;
    # on CPU it holds none, which is reported rather than returned as zero time.
    f = jax.jit(lambda a: a * 2 + 1)
    x = jnp.ones((64, 64))
    if jax.default_backend() == "gpu":
        got = benchmarking.device_kernel_seconds(f, x, calls=2)
        assert sum(map(len, got.values())) >= 2
        assert all(0 < t < 1 for ts in got.values() for t in ts)
    else:
        with pytest.raises(RuntimeError, match="no GPU kernel launches"):
            benchmarking.device_kernel_seconds(f, x)


def test_parse_dims_refuses_malformed_shapes():
    from pallas_kernels.benchmarking import parse_dims
    assert parse_dims("49152x4x1024", 3) == (49152, 4, 1024)
    for bad in ("64x4", "64x0x8", "axb"):
        with pytest.raises(ValueError):
            parse_dims(bad, 3)

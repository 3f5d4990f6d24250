"""The two-consumer grouped matmuls' tuning table: keys, merging writes, and
the API taking a tuned tiling for the device and shape where none is given
(the kernels replaced by recorders: they compile only on a Hopper GPU)."""
import jax.numpy as jnp
import pytest

from pallas_kernels import compat, dispatch
from pallas_kernels.grouped_matmul import api, tuning, two_consumers


def test_entries_merge_per_device_and_read_back(tmp_path):
    path = tmp_path / "table.json"
    tuning.write_entries("dev A", {tuning.table_key("gmm", "split", 1024, 1280): (256, 64, 128)},
                         path)
    tuning.write_entries("dev A", {tuning.table_key("tgmm", "split", 640, 1024): (64, 256, 128)},
                         path)
    tuning.write_entries("dev B", {tuning.table_key("gmm", "split", 1024, 1280): (128, 64, 256)},
                         path)
    table = tuning.load_table(path)
    assert tuning.tiling_for("dev A", "gmm", "split", 1024, 1280, table) == (256, 64, 128)
    assert tuning.tiling_for("dev A", "tgmm", "split", 640, 1024, table) == (64, 256, 128)
    assert tuning.tiling_for("dev B", "gmm", "split", 1024, 1280, table) == (128, 64, 256)
    assert tuning.tiling_for("dev B", "gmm", "pingpong", 1024, 1280, table) is None
    assert tuning.tiling_for("dev C", "gmm", "split", 1024, 1280, table) is None
    with pytest.raises(ValueError, match="no tuning key for kernel 'gmm' with schedule 'ping'"):
        tuning.table_key("gmm", "ping", 8, 8)


@pytest.mark.parametrize("transpose_rhs,pingpong", [(False, False), (True, False), (False, True)])
def test_the_api_takes_the_tuned_tiling_where_none_is_given(tmp_path, monkeypatch, transpose_rhs,
                                                            pingpong):
    m, k, n, g = 40, 192, 320, 3
    schedule = "pingpong" if pingpong else "split"
    tuned = {tuning.table_key("gmm_t" if transpose_rhs else "gmm", schedule, k, n): (64, 64, 256),
             tuning.table_key("tgmm", "split", k, n): (64, 256, 128)}
    monkeypatch.setattr(tuning, "TABLE_PATH", tmp_path / "table.json")
    tuning.write_entries("test device", tuned)
    monkeypatch.setattr(compat, "device_kind", lambda: "test device")
    seen = []

    def gmm(lhs, rhs, sizes, *, transpose_rhs, out_dtype, tiling, pingpong):
        seen.append(("gmm", tiling, pingpong))
        return jnp.zeros((lhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2]),
                         out_dtype)

    def tgmm(lhs, dout, sizes, *, out_dtype, tiling):
        seen.append(("tgmm", tiling))
        return jnp.zeros((sizes.shape[0], lhs.shape[1], dout.shape[1]), out_dtype)
    monkeypatch.setattr(two_consumers, "gmm", gmm)
    monkeypatch.setattr(two_consumers, "tgmm", tgmm)

    cfg = api._Config(jnp.dtype(jnp.bfloat16), None, dispatch.Choice("mosaic_gpu", False),
                      consumers=2, transpose_rhs=transpose_rhs, pingpong=pingpong)
    lhs = jnp.ones((m, k), jnp.bfloat16)
    rhs = jnp.ones((g, n, k) if transpose_rhs else (g, k, n), jnp.bfloat16)
    sizes = jnp.full((g,), m // g, jnp.int32)
    api._gmm_kernel(lhs, rhs, sizes, cfg)
    api._tgmm_kernel(lhs, jnp.ones((m, n), jnp.bfloat16), sizes, cfg)
    assert seen == [("gmm", (64, 64, 256), pingpong), ("tgmm", (64, 256, 128))]

    # A tiling given to the call wins over the table (the tgmm of a ping-pong
    # call keeps the table's: the given tiling is the gmm's).
    seen.clear()
    given = cfg._replace(tiling=(128, 64, 128))
    api._gmm_kernel(lhs, rhs, sizes, given)
    api._tgmm_kernel(lhs, jnp.ones((m, n), jnp.bfloat16), sizes, given)
    assert seen == [("gmm", (128, 64, 128), pingpong),
                    ("tgmm", (64, 256, 128) if pingpong else (128, 64, 128))]


"""The implementation= rule every op shares (pallas_kernels.dispatch) and the
shape helpers (pallas_kernels.shapes). GPUs are simulated by patching
pallas_kernels.compat, so every branch of the rule runs on CPU."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compat, dispatch, flash_attention, shapes
from pallas_kernels.attention import api as attention_api
from pallas_kernels.attention.blockspec import PortableBlockSizes
from pallas_kernels.dispatch import Choice, Table, takes_any
from pallas_kernels.grouped_matmul import api as gmm_api
from pallas_kernels.grouped_matmul import gmm
from pallas_kernels.quant_grouped_matmul import api as qgmm_api
from pallas_kernels.quant_matmul import api as quant_api
from pallas_kernels.quant_matmul import w8a8_matmul

TABLES = {
    "attention": attention_api.TABLE,
    "gmm": gmm_api.TABLE,
    "w8a8/fp8": quant_api.TABLE,
    "int4": quant_api.INT4_TABLE,
    "qgmm": qgmm_api.TABLE,
}
PUBLIC_NAMES = {
    "attention": attention_api.IMPLEMENTATIONS,
    "gmm": gmm_api.IMPLEMENTATIONS,
    "w8a8/fp8": quant_api.IMPLEMENTATIONS,
    "qgmm": qgmm_api.IMPLEMENTATIONS,
}


def _no_limit_on_tiling(args):
    return None if args.tiling is None else "takes no tiling"


# Every name, no limits but 'xla' refusing tiling.
TOY = Table("toy op", {"xla": _no_limit_on_tiling, "cudnn": takes_any, "ragged_dot": takes_any,
                       "mosaic_gpu": takes_any, "blockspec": takes_any},
            preference=("pallas", "ragged_dot", "xla"))


@pytest.fixture(params=["cpu", "hopper", "ampere"])
def machine(request, monkeypatch):
    """The machine the rule sees: this CPU, or a simulated H100 or A100."""
    if request.param != "cpu":
        hopper = request.param == "hopper"
        monkeypatch.setattr(compat, "platform", lambda: "gpu")
        monkeypatch.setattr(compat, "is_hopper", lambda: hopper)
        monkeypatch.setattr(compat, "device_kind",
                            lambda: "NVIDIA H100 80GB HBM3" if hopper else "NVIDIA A100")
    return request.param


def test_auto_takes_the_first_native_implementation(machine):
    want = {"cpu": Choice("xla", False), "hopper": Choice("mosaic_gpu", False),
            "ampere": Choice("blockspec", False)}[machine]
    assert TOY.resolve("auto", tiling=None) == want


def test_auto_skips_what_cannot_take_the_call(machine):
    # only 'ragged_dot' (native on GPU) or 'xla' are left
    table = Table("toy op", {**TOY.supports, "mosaic_gpu": lambda a: "no", "blockspec":
                             lambda a: "no"}, preference=TOY.preference)
    want = "xla" if machine == "cpu" else "ragged_dot"
    assert table.resolve("auto", tiling=None) == Choice(want, False)


def test_interpret_default(machine):
    """interpret=None: interpreted off GPU, compiled on one; 'mosaic_gpu'
    always compiles, so on CPU it is the device that refuses it."""
    on_gpu = machine != "cpu"
    assert TOY.resolve("blockspec", tiling=None) == Choice("blockspec", not on_gpu)
    assert TOY.resolve("blockspec", True, tiling=None) == Choice("blockspec", True)
    want_pallas = {"cpu": Choice("blockspec", True), "hopper": Choice("mosaic_gpu", False),
                   "ampere": Choice("blockspec", False)}[machine]
    assert TOY.resolve("pallas", tiling=None) == want_pallas
    # interpreting skips the compiled-only Mosaic kernel
    assert TOY.resolve("pallas", True, tiling=None) == Choice("blockspec", True)
    assert TOY.resolve("xla", tiling=None) == Choice("xla", False)
    assert dispatch.default_interpret() is not on_gpu


@pytest.mark.parametrize("implementation, interpret, match", [
    ("cudnn", None, "implementation='cudnn' cannot run this toy op: needs a GPU "
                    "(backend is 'cpu')"),
    ("mosaic_gpu", None, "implementation='mosaic_gpu' cannot run this toy op: needs a Hopper "
                         "(sm_90) GPU; this device is 'cpu'"),
    ("mosaic_gpu", True, "implementation='mosaic_gpu' cannot run this toy op: runs compiled "
                         "only (interpret=True given)"),
    ("blockspec", False, "implementation='blockspec' cannot run this toy op: compiled needs a "
                         "GPU (backend is 'cpu'); pass interpret=True"),
    ("pallas", False, "implementation='pallas' cannot run this toy op: mosaic_gpu: needs a "
                      "Hopper (sm_90) GPU; this device is 'cpu'; blockspec: compiled needs a GPU"),
    ("xla", True, "implementation='xla' cannot run this toy op: takes no interpret"),
    ("ragged_dot", False, "implementation='ragged_dot' cannot run this toy op: takes no "
                          "interpret"),
    ("auto", True, "interpret=True applies to a named Pallas kernel"),
    ("triton", None, "unknown toy op implementation 'triton'; choose one of ('auto', 'xla', "
                     "'cudnn', 'ragged_dot', 'pallas', 'mosaic_gpu', 'blockspec')"),
])
def test_errors_on_cpu_name_the_implementation_and_reason(implementation, interpret, match):
    with pytest.raises(ValueError, match=re.escape(match)) as err:
        TOY.resolve(implementation, interpret, tiling=None)
    assert "\n" not in str(err.value)


def test_the_ops_own_limits_come_before_the_device(machine):
    """The same call gets the same complaint on every machine."""
    with pytest.raises(ValueError, match=r"^implementation='xla' cannot run this toy op: takes "
                                         r"no tiling$"):
        TOY.resolve("xla", tiling=(8, 8, 8))
    table = Table("toy op", {"mosaic_gpu": lambda a: "a limit"}, preference=("pallas",))
    with pytest.raises(ValueError, match="mosaic_gpu' cannot run this toy op: a limit$"):
        table.resolve("mosaic_gpu")


def test_auto_without_a_taker_lists_every_reason():
    with pytest.raises(ValueError, match=re.escape(
            "implementation='auto' finds no toy op implementation for this call: pallas: "
            "mosaic_gpu: needs a Hopper (sm_90) GPU; this device is 'cpu'; blockspec: compiled "
            "needs a GPU (backend is 'cpu'); pass interpret=True; ragged_dot: not native on "
            "'cpu' (lowered to a dense product over every group); xla: takes no tiling")):
        TOY.resolve("auto", tiling=(8, 8, 8))


def test_explicit_ragged_dot_runs_off_gpu():
    assert TOY.resolve("ragged_dot", tiling=None) == Choice("ragged_dot", False)


@pytest.mark.parametrize("op", TABLES)
def test_every_op_uses_the_shared_names(op):
    table = TABLES[op]
    shared = set(dispatch.NAMES) - {"auto", "pallas"}
    assert set(table.supports) <= shared
    assert set(table.preference) <= set(table.names) - {"auto"}
    assert table.preference[-1] == "xla"  # what 'auto' lands on on a CPU
    assert table.names[0] == "auto" and "pallas" in table.names
    assert set(table.names) <= set(dispatch.NAMES)
    if op in PUBLIC_NAMES:
        assert PUBLIC_NAMES[op] == table.names


@pytest.mark.parametrize("op", TABLES)
def test_every_op_runs_xla_under_auto_on_cpu(op):
    table = TABLES[op]
    qkv = jnp.ones((1, 8, 2, 64), jnp.bfloat16)
    args = {"attention": dict(q=qkv, k=qkv, v=qkv, block_sizes=None, **ATTENTION_OPTIONS),
            "gmm": dict(dtype=jnp.bfloat16, tiling=None),
            "w8a8/fp8": dict(tiling=None, block_sizes=None),
            "int4": dict(x=jnp.ones((2, 128), jnp.bfloat16),
                         packed=jnp.ones((128, 64), jnp.uint8), zeros=None, group_size=64,
                         block_n=None, split_k=None),
            "qgmm": dict(kind="int8", group_size=64, tiling=None)}[op]
    assert table.resolve("auto", **args) == Choice("xla", False)
    assert table.resolve("pallas", **args) == Choice("blockspec", True)


ATTENTION_OPTIONS = dict(causal=True, segment_ids=None, sliding_window=None, logit_softcap=None,
                         scale=None)


def test_attention_follows_its_table_on_a_simulated_hopper(monkeypatch):
    monkeypatch.setattr(compat, "platform", lambda: "gpu")
    monkeypatch.setattr(compat, "is_hopper", lambda: True)
    table = attention_api.TABLE
    bf16, f32 = jnp.ones((1, 8, 2, 64), jnp.bfloat16), jnp.ones((1, 8, 2, 64), jnp.float32)

    def resolve(implementation, x, block_sizes=None, **options):
        return table.resolve(implementation, q=x, k=x, v=x, block_sizes=block_sizes,
                             **{**ATTENTION_OPTIONS, **options})
    assert resolve("auto", bf16) == Choice("mosaic_gpu", False)
    assert resolve("auto", f32) == Choice("blockspec", False)  # the Mosaic kernel is 16-bit
    assert resolve("pallas", bf16, PortableBlockSizes()) == Choice("blockspec", False)
    assert resolve("cudnn", bf16) == Choice("cudnn", False)
    with pytest.raises(ValueError, match="^implementation='cudnn' cannot run this attention: "
                                         "does not support logit_softcap$"):
        resolve("cudnn", bf16, logit_softcap=5.0)
    with pytest.raises(ValueError, match="'mosaic_gpu' cannot run this attention: block_sizes "
                                         "is a PortableBlockSizes"):
        resolve("mosaic_gpu", bf16, PortableBlockSizes())


def test_grouped_matmul_follows_its_table_on_a_simulated_hopper(monkeypatch):
    monkeypatch.setattr(compat, "platform", lambda: "gpu")
    monkeypatch.setattr(compat, "is_hopper", lambda: True)
    table = gmm_api.TABLE
    assert table.resolve("auto", dtype=jnp.bfloat16, tiling=None) == Choice("mosaic_gpu", False)
    assert table.resolve("auto", dtype=jnp.float32, tiling=None) == Choice("ragged_dot", False)
    # the portable kernels run interpreted only
    with pytest.raises(ValueError, match="float32.*blockspec: runs interpreted only"):
        table.resolve("pallas", dtype=jnp.float32, tiling=None)
    with pytest.raises(ValueError, match="blockspec' cannot run this grouped matmul: runs "
                                         "interpreted only"):
        table.resolve("blockspec", dtype=jnp.bfloat16, tiling=None)


def test_quantized_matmul_settings_pick_the_kernel_on_a_simulated_hopper(monkeypatch):
    monkeypatch.setattr(compat, "platform", lambda: "gpu")
    monkeypatch.setattr(compat, "is_hopper", lambda: True)
    table = quant_api.TABLE
    assert table.resolve("auto", tiling=None, block_sizes=None) == Choice("mosaic_gpu", False)
    # block_sizes tune the portable kernel, so 'pallas' takes it
    assert table.resolve("pallas", tiling=None, block_sizes=(64, 64, 64)) == \
        Choice("blockspec", False)
    with pytest.raises(ValueError, match="block_sizes=.* apply to the portable kernel"):
        table.resolve("mosaic_gpu", tiling=None, block_sizes=(64, 64, 64))


def test_public_calls_raise_the_rule_s_errors_on_cpu():
    q = jnp.ones((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"^implementation='cudnn' cannot run this attention: "
                                         r"needs a GPU \(backend is 'cpu'\)$"):
        flash_attention(q, q, q, implementation="cudnn")
    with pytest.raises(ValueError, match="^implementation='mosaic_gpu' cannot run this "
                                         "attention: the Mosaic GPU kernel needs a Hopper"):
        flash_attention(q, q, q, implementation="mosaic_gpu")
    with pytest.raises(ValueError, match="^implementation='xla' cannot run this attention: takes "
                                         "no interpret"):
        flash_attention(q, q, q, implementation="xla", interpret=True)
    lhs, rhs, sizes = jnp.ones((8, 64), jnp.bfloat16), jnp.ones((2, 64, 64), jnp.bfloat16), \
        jnp.array([3, 5])
    with pytest.raises(ValueError, match="^implementation='mosaic_gpu' cannot run this grouped "
                                         "matmul: needs a Hopper"):
        gmm(lhs, rhs, sizes, implementation="mosaic_gpu")
    with pytest.raises(ValueError, match="applies to a named Pallas kernel"):
        gmm(lhs, rhs, sizes, implementation="auto", interpret=True)
    # 'blockspec' and 'pallas' are the same kernel on CPU
    np.testing.assert_array_equal(gmm(lhs, rhs, sizes, implementation="blockspec"),
                                  gmm(lhs, rhs, sizes, implementation="pallas"))
    xq, wq = jnp.ones((4, 64), jnp.int8), jnp.ones((16, 64), jnp.int8)
    xs, ws = jnp.ones((4,)), jnp.ones((16,))
    with pytest.raises(ValueError, match="^implementation='xla' cannot run this quantized "
                                         "matmul: block_sizes=.* apply to the portable kernel"):
        w8a8_matmul(xq, xs, wq, ws, implementation="xla", block_sizes=(16, 16, 16))


def test_cdiv_ints_and_traced_values():
    assert [shapes.cdiv(a, 4) for a in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert shapes.cdiv(np.int64(9), 4) == 3 and isinstance(shapes.cdiv(9, 4), int)
    assert shapes.round_up(9, 4) == 12 and shapes.round_up(8, 4) == 8
    # a traced value lowers to one add and one integer division
    jaxpr = jax.make_jaxpr(lambda x: shapes.cdiv(x, 64))(jnp.int32(130))
    assert [e.primitive.name for e in jaxpr.eqns] == ["add", "div"]
    assert jax.jit(lambda x: shapes.cdiv(x, 64))(jnp.int32(130)) == 3


def test_padding_helpers():
    x = jnp.arange(6.0).reshape(2, 3)
    assert shapes.pad_to(x, (2, 3)) is x
    np.testing.assert_array_equal(shapes.pad_to(x, (3, 4)),
                                  [[0, 1, 2, 0], [3, 4, 5, 0], [0, 0, 0, 0]])
    assert shapes.pad_axis_to_multiple(x, 1, 3) is x
    np.testing.assert_array_equal(shapes.pad_axis_to_multiple(x, 1, 2, mode="edge"),
                                  [[0, 1, 2, 2], [3, 4, 5, 5]])

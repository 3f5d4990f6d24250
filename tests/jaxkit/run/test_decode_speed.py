"""python -m jaxkit.run.decode_speed: several weight formats measured in one
process, the weight bytes a decode step reads, the roofline arithmetic and
bad arguments refused in one line before anything compiles."""
import json
from pathlib import Path

import jax
import pytest
from flax import nnx

from jaxkit.config import load_config
from jaxkit.generate import Engine
from jaxkit.layers import Linear
from jaxkit.run.build import build_model
from jaxkit.run.decode_speed import main, roofline, weight_bytes_per_step

CONFIG = str(Path(__file__).parents[3] / "configs/quickstart.yaml")
# K = 128 and 256: whole int4 groups and fp8 blocks of 128
TINY = ["model.d_model=128", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "model.mlp_hidden=256", "model.vocab_size=64", "model.max_seq_len=32",
        "data.seq_len=32", "model.compute_dtype=bfloat16", "model.attention.implementation=xla"]
SETS = [a for kv in TINY for a in ("--set", kv)]
SHORT = ["--prompt-len", "4", "--steps", "2", "--warmup", "1"]


def test_formats_side_by_side(tmp_path, capsys):
    out = tmp_path / "speed.json"
    main([CONFIG, *SETS, "--quant", "bf16", "w8a8", "int4", "fp8", "--batch", "1", "3", *SHORT,
          "--json", str(out)])
    saved = json.loads(out.read_text())
    results = saved["results"]
    assert [(r["quant"], r["batch"]) for r in results] == [
        (q, b) for q in ("bf16", "w8a8", "int4", "fp8") for b in (1, 3)]
    weights = {r["quant"]: r["weight_bytes_per_step"] for r in results}
    # linear weights: 2 bytes (bf16), 1 byte + scales (w8a8, fp8), half a byte + scales (int4)
    assert weights["bf16"] > weights["w8a8"] > weights["int4"]
    assert weights["bf16"] > weights["fp8"] > weights["int4"]
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in results)
    # a CPU measures no copy bandwidth, so there is no roofline
    assert saved["copy_gb_per_s"] is None and results[0]["roofline_fraction"] is None
    table = capsys.readouterr().out.split("| quant |")[1]
    assert len(table.strip().splitlines()) == 2 + len(results) and "| int4 | 3 |" in table


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_a_step_reads(tied):
    cfg = load_config(CONFIG, TINY + [f"model.tie_embeddings={str(tied).lower()}"])
    model = build_model(cfg)
    engine = Engine(model)
    linears = sum(m.kernel.size for _, m in nnx.iter_modules(model) if isinstance(m, Linear))
    embed = model.embed.size
    others = sum(x.size for x in jax.tree.leaves(nnx.state(model))) - linears - embed
    # Linear kernels (the head among them when untied) in bf16, norm scales in float32;
    # an untied embedding table is gathered, not read
    assert weight_bytes_per_step(engine) == 2 * linears + 4 * others + (2 * embed if tied else 0)


def test_roofline():
    result = {"batch": 8, "weight_bytes_per_step": 1e9, "decode_tokens_per_s": 2000.0,
              "hbm_gb_per_s": 2.5}
    r = roofline(result, 2e12)
    assert r["roofline_tokens_per_s"] == pytest.approx(8 * 2e12 / 1e9)
    assert r["roofline_fraction"] == pytest.approx(2000 / 16000)
    assert r["copy_fraction"] == pytest.approx(2.5e9 / 2e12)
    assert roofline(result, None) == dict.fromkeys(r)


@pytest.mark.parametrize("argv, message", [
    (["--quant", "int3"], "--quant 'int3' is not one of"),
    (["--quant", "int4", "int4"], "--quant names a format twice"),
    (["--batch", "2", "0"], "--batch must be >= 1, got 0"),
    (["--prompt-len", "30"], "--prompt-len 30 and 6 new tokens exceed model.max_seq_len 32"),
    (["--set", "model.compute_dtype=float32"], "which is float32: set model.compute_dtype"),
    (["--quant", "fp8", "--set", "model.d_model=96"],
     "--quant fp8 cannot convert this model: fp8 blockwise weights need K divisible by 128"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(SystemExit) as exit_:
        main([CONFIG, *SETS, *SHORT, *argv])
    assert message in str(exit_.value) and "\n" not in str(exit_.value)

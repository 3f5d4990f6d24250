"""The profile breakdown: device kernels by category, host/idle time as the
rest of the steps' wall time."""
import jax
import jax.numpy as jnp

from jaxkit.run.profile import breakdown, classify, format_table, hlo_op_names


def _event(name, dur_us, pid=1, ts=0, **args):
    return {"ph": "X", "pid": pid, "name": name, "dur": dur_us, "ts": ts, "args": args}


def test_categories_and_idle():
    trace = {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        _event("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 6000),
        _event("sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n", 2000),
        _event("with_scratch_mosaic_gpu_kernel", 3000),
        _event("loop_multiply_fusion_3", 1000, long_name="jit(step)/optimizer/mul"),
        _event("loop_add_fusion_1", 500),
        _event("ncclDevKernel_AllReduce_Sum_f32", 400),
        _event("MemcpyD2D", 100, ts=15900),  # the device timeline spans 16 ms
        _event("host_side_thing", 99999, pid=2),  # host threads do not count as device time
    ]}
    out = breakdown(trace, steps=2)
    ms = out["per_step_ms"]
    assert ms["matmul"] == 4.0 and ms["attention"] == 1.5 and ms["optimizer update"] == 0.5
    assert ms["elementwise/other"] == 0.25 and ms["communication"] == 0.2 and ms["copies"] == 0.05
    assert abs(out["device_busy_ms"] - 6.5) < 1e-9 and abs(ms["host/idle"] - 1.5) < 1e-9
    assert out["top_kernels"][0] == ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 3.0)
    assert "matmul" in format_table(out)


def test_classify_uses_scope_names():
    assert classify(_event("fusion_12", 1, long_name="jit(step)/moe_dispatch/gather")) == \
        "moe routing/dispatch"
    assert classify(_event("body_gmm_kernel", 1)) == "moe grouped matmul"


def test_fusion_kernels_are_attributed_by_the_compiled_module():
    """GPU kernels named after their fusion ('.' as '_') take the JAX op of
    that fusion from the module's text, scope included."""
    def step(x, w):
        with jax.named_scope("optimizer"):
            return jnp.tanh(x @ w).astype(jnp.bfloat16).sum(0)
    text = jax.jit(step).lower(jnp.ones((8, 4)), jnp.ones((4, 2))).compile().as_text()
    ops = hlo_op_names(text)
    assert ops and all("optimizer" in op for op in ops.values())
    hlo = ('  %loop_convert_fusion.15 = f32[8]{0} fusion(%p), kind=kLoop, calls=%c, '
           'metadata={op_name="jit(train_step)/optimizer/convert_element_type"}')
    trace = {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        _event("loop_convert_fusion_15", 2000), _event("loop_add_fusion_2", 1000, ts=2000)]}
    out = breakdown(trace, steps=1, op_names=hlo_op_names(hlo))
    assert out["per_step_ms"]["optimizer update"] == 2.0
    assert out["per_step_ms"]["elementwise/other"] == 1.0
    assert out["kernel_ops"] == {
        "loop_convert_fusion_15": "jit(train_step)/optimizer/convert_element_type"}
    assert "optimizer/convert_element_type" in format_table(out)


def test_no_mfu_without_a_known_peak():
    from jaxkit.train import flops
    assert flops.peak_tflops("cpu") is None
    assert flops.peak_tflops("NVIDIA H200") == 989.0


def test_speed_measures_a_config_end_to_end():
    from jaxkit.config import load_config
    from jaxkit.run.speed import measure
    cfg = load_config(None, ["data.kind=mqar", "data.seq_len=32", "data.batch_size=4",
                             "model.max_seq_len=32", "model.d_model=32", "model.num_layers=1",
                             "model.num_heads=2", "model.mlp_hidden=64", "train.eval_every=0",
                             "checkpoint.enabled=false", "train.progress=false"])
    result = measure(cfg, warmup=1, rounds=1)
    assert result["compile_seconds"] > 0 and result["step_ms"] > 0 and result["mfu"] is None
    assert result["tokens_per_second"] == 4 * 32 / (result["step_ms"] / 1e3)
    assert "per_step_ms" in result["breakdown"]

"""Model shapes, logical axes, GQA, tied/untied heads, FLOP count, and that a
tiny run's loss decreases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkit.config import ModelConfig, load_config
from jaxkit.models import Transformer, count_params
from jaxkit.train import flops
from jaxkit.train.loss import cross_entropy
from jaxkit.train.optim import make_schedule

TINY = ModelConfig(vocab_size=37, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   mlp_hidden=48, max_seq_len=32, compute_dtype="float32")


@pytest.mark.parametrize("tie", [True, False])
def test_shapes_and_param_count(tie):
    cfg = ModelConfig(**{**TINY.__dict__, "tie_embeddings": tie})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 11), 0, cfg.vocab_size)
    logits, aux = model(tokens)
    assert logits.shape == (3, 11, 37) and logits.dtype == jnp.float32
    d, h, kv, dh, f, v, L = 32, 4, 2, 8, 48, 37, 2
    per_layer = d * h * dh * 2 + d * kv * dh * 2 + 3 * d * f + 2 * d
    expected = v * d + L * per_layer + d + (0 if tie else d * v)
    assert count_params(model) == expected


def test_every_param_has_logical_axes():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata()["logical_axes"]
            assert len(axes) == var[...].ndim, path
            assert set(axes) <= {"embed", "heads", "kv_heads", "mlp", "vocab", "norm"}, path


def test_causality():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    t = jax.random.randint(jax.random.key(2), (1, 12), 0, 37)
    t2 = t.at[0, 8].set((t[0, 8] + 1) % 37)
    a, _ = model(t)
    b, _ = model(t2)
    np.testing.assert_allclose(a[0, :8], b[0, :8], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[0, 8:], b[0, 8:])


def test_bf16_compute_keeps_fp32_params():
    cfg = ModelConfig(**{**TINY.__dict__, "compute_dtype": "bfloat16"})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits, _ = model(jnp.ones((2, 5), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_flops_match_hand_count():
    cfg = ModelConfig(vocab_size=10, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1,
                      mlp_hidden=16, max_seq_len=4)
    # q and o: 8*8 each; k and v: 8*4 each; SwiGLU: 3*8*16; head: 8*10
    assert flops.matmul_params_per_token(cfg) == 64 + 64 + 32 + 32 + 384 + 80
    # forward: 2 per matmul param + causal attention 2 * 2*S*H*Dh / 2 = 64; x3 for fwd+bwd
    assert flops.flops_per_token(cfg, seq_len=4) == 3 * (2 * 656 + 64)
    tokens_s, peak = 1000.0, 1e-6  # 1 MFLOP/s peak
    assert flops.mfu(tokens_s, cfg, 4, 1, peak) == pytest.approx(1000 * 4128 / 1e6)
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops("cpu", override=2.5) == 2.5


def test_flops_count_each_layers_mixer():
    """Linear-attention layers count their chunked products and projections,
    not S^2 attention; windows and block-sparse policies count kept keys."""
    from jaxkit.config import AttentionConfig, SparseAttentionConfig
    base = dict(vocab_size=10, d_model=8, num_layers=2, num_heads=2, num_kv_heads=2,
                mlp_hidden=16, max_seq_len=4096)
    dense = ModelConfig(**base)
    hybrid = ModelConfig(**base, mixer="linear", softmax_every=2)  # layer 0 linear
    # linear: q, k, v, gate, o (5 * 8*8) and one decay per head (8*2)
    assert (flops.matmul_params_per_token(hybrid) - flops.matmul_params_per_token(dense)
            == 5 * 64 + 16 - 4 * 64)
    softmax_layer = 2 * 2 * 2 * 4 * 1024  # 2*2*H*Dh per key, S/2 keys at S=2048
    linear_layer = 2 * (2 * 64 * 4 + 4 * 4 * 4)  # H * (2*C*Dh + 4*Dh^2)
    assert flops.mixing_flops_per_token(dense, 2048) == 2 * softmax_layer
    assert flops.mixing_flops_per_token(hybrid, 2048) == softmax_layer + linear_layer
    windowed = ModelConfig(**base, attention=AttentionConfig(sliding_window=256))
    assert flops.visible_keys(windowed, 0, 2048) == 256 * (1 - 256 / 4096)
    assert flops.visible_keys(windowed, 0, 128) == 64
    sparse = ModelConfig(**base, attention=AttentionConfig(sparse=SparseAttentionConfig(
        policy="infllm_v2", block_size=64, top_k_blocks=8)))
    assert flops.visible_keys(sparse, 1, 4096) == 8 * 64
    assert flops.visible_keys(sparse, 0, 512) == 256  # short: S/2 is below the budget
    dense_short = ModelConfig(**base, attention=AttentionConfig(sparse=SparseAttentionConfig(
        policy="infllm_v2", block_size=64, top_k_blocks=8, dense_below=2048)))
    assert flops.visible_keys(dense_short, 0, 2048) == 1024  # dense up to dense_below
    assert flops.visible_keys(dense_short, 0, 4096) == 8 * 64


def test_cross_entropy_matches_hand_computation():
    logits = jnp.array([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    targets = jnp.array([[0, 2]])
    lse0 = np.log(np.exp(2) + 1 + np.exp(-1))
    loss, m = cross_entropy(logits, targets, jnp.array([[1, 0]]), z_loss=0.5)
    assert float(m["ce"]) == pytest.approx(lse0 - 2.0, rel=1e-6)
    assert float(loss) == pytest.approx(lse0 - 2.0 + 0.5 * lse0 ** 2, rel=1e-6)
    assert float(m["accuracy"]) == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules(schedule):
    cfg = load_config(None, [f"optimizer.schedule={schedule}", "optimizer.warmup_steps=10",
                             "optimizer.learning_rate=1.0", "optimizer.min_lr_ratio=0.1"])
    lr = make_schedule(cfg.optimizer, 100)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1.0)
    end = float(lr(100))
    assert end == pytest.approx({"cosine": 0.1, "wsd": 0.1, "constant": 1.0}[schedule], abs=1e-3)
    if schedule == "wsd":  # stable until the last 20% of the post-warmup steps
        assert float(lr(80)) == pytest.approx(1.0)


def test_tiny_run_loss_decreases():
    cfg = load_config(None, ["model.vocab_size=37", "model.d_model=32", "model.num_layers=2",
                             "model.num_heads=4", "model.mlp_hidden=64", "model.max_seq_len=16",
                             "data.seq_len=16", "train.steps=40", "optimizer.learning_rate=1e-2",
                             "optimizer.warmup_steps=5", "model.compute_dtype=float32"])
    from jaxkit.train.optim import make_optimizer
    from jaxkit.train.step import make_train_step
    from jaxkit.run.build import split_model
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    graphdef, _, params, model_state = split_model(model)
    opt = make_optimizer(cfg.optimizer, 40)
    step = jax.jit(make_train_step(graphdef, opt, make_schedule(cfg.optimizer, 40),
                                   grad_accum=2, z_loss=1e-4))
    state = dict(params=params, opt_state=opt.init(params), model_state=model_state,
                 step=jnp.zeros((), jnp.int32))
    rng = np.random.default_rng(0)
    seq = np.tile(rng.integers(0, 37, 8), 3)[None].repeat(8, 0)  # a repeated pattern to learn
    batch = dict(inputs=jnp.asarray(seq[:, :16]), targets=jnp.asarray(seq[:, 1:17]))
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.3 * losses[0], losses
    assert int(state["step"]) == 40


def test_packed_documents_do_not_see_each_other():
    """With document segments (data.document_mask) each document of a window
    gives the logits it would alone, and the train/eval step uses them."""
    from jaxkit.run.build import split_model
    from jaxkit.data.batches import document_segments
    from jaxkit.train.step import make_eval_step
    eos = 36
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    first = np.append(rng.integers(0, eos, 6), eos)  # a document ends with EOS
    second = rng.integers(0, eos, 9)
    window = np.concatenate([first, second])[None]
    segments, positions = document_segments(window, eos)
    packed, _ = model(jnp.asarray(window), jnp.asarray(positions), jnp.asarray(segments))
    alone, _ = model(jnp.asarray(second[None]))
    np.testing.assert_allclose(packed[0, 7:], alone[0], rtol=1e-5, atol=1e-5)
    other = window.copy()
    other[0, :6] = (other[0, :6] + 5) % eos  # another first document, same boundary
    changed, _ = model(jnp.asarray(other), jnp.asarray(positions), jnp.asarray(segments))
    np.testing.assert_allclose(changed[0, 7:], packed[0, 7:], rtol=1e-5, atol=1e-5)
    assert not np.allclose(changed[0, :7], packed[0, :7])

    graphdef, _, params, model_state = split_model(model)
    targets = np.roll(window, -1, axis=1)
    batch = dict(inputs=jnp.asarray(window), targets=jnp.asarray(targets),
                 segment_ids=jnp.asarray(segments), positions=jnp.asarray(positions))
    metrics = make_eval_step(graphdef)(params, model_state, batch)
    want, _ = cross_entropy(packed, jnp.asarray(targets), None)
    np.testing.assert_allclose(float(metrics["ce"]), float(want), rtol=1e-6)

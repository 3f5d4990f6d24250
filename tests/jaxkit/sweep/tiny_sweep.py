"""Fixtures of the sweep tests: a tiny quickstart-like base config (MQAR
data: no files) and sweep files beside it, and the environment their
jaxkit train subprocesses share."""
import pytest
import yaml

BASE = {
    "model": {"vocab_size": 64, "d_model": 32, "num_layers": 1, "num_heads": 2,
              "mlp_hidden": 48, "max_seq_len": 32, "compute_dtype": "float32"},
    "data": {"kind": "mqar", "seq_len": 32, "batch_size": 4, "mqar_vocab_size": 64,
             "mqar_num_kv_pairs": 4},
    "optimizer": {"warmup_steps": 1},
    "train": {"steps": 4, "log_every": 2, "eval_every": 4, "eval_batches": 1, "progress": False},
    "checkpoint": {"every": 0},  # at the end only
}


@pytest.fixture
def write_sweep(tmp_path, monkeypatch):
    """write_sweep(dict) -> the path of a sweep file beside base.yaml in
    tmp_path (also the current folder: run directories go under it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))

    def write(spec: dict, name: str = "sweep.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump({"base": "base.yaml"} | spec, sort_keys=False))
        return path
    return write


@pytest.fixture
def train_env(tmp_path_factory, monkeypatch):
    """Fast CPU compiles and one compilation cache for the sweep's runs (a
    seed changes no program, so a run's seeds compile once)."""
    cache = tmp_path_factory.getbasetemp() / "sweep_jax_cache"
    cache.mkdir(exist_ok=True)
    for key, value in {"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
                       "XLA_FLAGS": "--xla_backend_optimization_level=0 "
                                    "--xla_llvm_disable_expensive_passes=true"}.items():
        monkeypatch.setenv(key, value)

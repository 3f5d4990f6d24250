"""Typed run configuration: frozen dataclasses loaded from YAML with strict checks.

Every key is checked on loading: an unknown key names the closest valid ones,
a wrong type names the key and the expected type, and an impossible
combination (heads not dividing d_model, ...) names the values.

This package imports only the standard library and yaml, so loading and
printing a config never starts jax. The checks that need the packages a
config configures (mesh.rules against the sharding rules, model.quant against
the quantisation formats and kernels) run where the config becomes objects:
jaxkit.run.build.check_config.

schema.py holds the sections, loading.py reads and writes them, checks.py
checks a loaded Config.
"""
from jaxkit.config.checks import check_ranges, validate
from jaxkit.config.loading import load_config, reference_markdown, save_config, to_dict
from jaxkit.config.schema import (LORA_TARGETS, AttentionConfig, CheckpointConfig, Config,
                                  ConfigError, DataConfig, GenerateConfig, LinearAttentionConfig,
                                  LoRAConfig, LoRATarget, MeshConfig, ModelConfig, MoEConfig,
                                  OptimizerConfig, QuantConfig, SparseAttentionConfig,
                                  SparsityConfig, SparsityTarget)

__all__ = ["LORA_TARGETS", "AttentionConfig", "CheckpointConfig", "Config", "ConfigError",
           "DataConfig", "GenerateConfig", "LinearAttentionConfig", "LoRAConfig", "LoRATarget",
           "MeshConfig", "ModelConfig", "MoEConfig", "OptimizerConfig", "QuantConfig",
           "SparseAttentionConfig", "SparsityConfig", "SparsityTarget", "check_ranges",
           "load_config", "reference_markdown", "save_config", "to_dict", "validate"]

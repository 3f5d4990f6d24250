"""Conversion between jaxkit models and Hugging Face model directories
(Llama, Mistral, Mixtral): config.json <-> ModelConfig (hf_config), tensors
<-> parameters (hf_weights), the directory's files (hf_files) and tokenizer
files for jaxkit's tokenizers (hf_tokenizer). `jaxkit convert`
(jaxkit.run.convert) puts them together."""
from jaxkit.interop.errors import ConversionError
from jaxkit.interop.hf_config import hf_config_from_model, model_config_from_hf
from jaxkit.interop.hf_files import read_hf_config, read_weights, stored_dtype, write_hf_dir
from jaxkit.interop.hf_weights import hf_from_params, params_from_hf

__all__ = ["ConversionError", "hf_config_from_model", "hf_from_params", "model_config_from_hf",
           "params_from_hf", "read_hf_config", "read_weights", "stored_dtype", "write_hf_dir"]

"""Text generation: KV caches (contiguous or paged, float or int8/fp8) and
the recurrent states of linear attention layers, the prefill and decode
steps, sampling, and the Generator API.

    cache      per-layer caches as pytrees: KV (the ring rule of decode_attention) or state
    pages      the page allocator and page tables of paged caches
    sampling   greedy, temperature, top-k and top-p as pure functions
    text       incremental detokenization and stop strings
    engine     compiled prefill and decode steps of a batch
    generator  the Python API: Generator.generate(prompts, ...)
"""
from jaxkit.generate.cache import KVCache, StateCache, empty_caches, model_caches
from jaxkit.generate.engine import Engine
from jaxkit.generate.generator import Generation, GenerationError, Generator
from jaxkit.generate.pages import PageAllocator

__all__ = ["Engine", "Generation", "GenerationError", "Generator", "KVCache", "PageAllocator",
           "StateCache", "empty_caches", "model_caches"]

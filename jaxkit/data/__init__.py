"""Data: tokenizers (byte-level, BPE, tokenizer.json files), token files
(streams of documents, or rows packed with segment ids), preparation from
text, JSONL and parquet files, deterministic batches and the MQAR synthetic
task."""
from jaxkit.data.batches import TokenBatcher
from jaxkit.data.errors import DataError
from jaxkit.data.mqar import MQARTask, mqar_accuracy
from jaxkit.data.prepare import (STDLIB_MAX_BYTES, default_corpus_paths, prepare,
                                 prepare_stdlib)
from jaxkit.data.token_file import TokenFile, unigram_entropy, write_token_file
from jaxkit.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

__all__ = ["ByteTokenizer", "DataError", "HFTokenizer", "MQARTask", "STDLIB_MAX_BYTES",
           "TokenBatcher", "TokenFile", "default_corpus_paths", "load_tokenizer", "mqar_accuracy",
           "prepare", "prepare_stdlib", "train_bpe", "unigram_entropy", "write_token_file"]

"""jaxkit eval --params: an exported jaxkit model, and the same model
converted to Hugging Face and back, evaluated on packed rows of a JSONL file
prepared with the converted model's tokenizer.json: the command's perplexity
is the one a forward pass through the Python API gives, and both copies of
the weights agree."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx

from jaxkit.checkpoint import export_params
from jaxkit.cli import main
from jaxkit.config import load_config
from jaxkit.data import TokenBatcher, prepare
from jaxkit.interop.hf_tokenizer import byte_tokenizer_json
from jaxkit.run.build import build_model
from jaxkit.run.convert import convert_hf_to_jaxkit, convert_jaxkit_to_hf
from jaxkit.run.load import load_model

SEQ_LEN, BATCH, BATCHES = 31, 4, 3
EOS = 258  # the byte-level tokenizer's
MODEL = dict(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
             mlp_hidden=64, max_seq_len=64, tie_embeddings=False, compute_dtype="float32")
DATA = ["--set", f"data.seq_len={SEQ_LEN}", "--set", f"data.batch_size={BATCH}",
        "--set", "data.document_mask=true"]


def _eval(capsys, *args) -> dict:
    main(["eval", *args, "--batches", str(BATCHES), *DATA])
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def _perplexity_by_hand(cfg, params, data_dir) -> float:
    """exp of the mean next-token loss over the eval batches' counted
    targets, from the model's float32 logits (log-softmax in float64)."""
    model = load_model(cfg, params=params)
    val = TokenBatcher(data_dir / "val", SEQ_LEN, BATCH, cfg.data.seed + 1, eos_id=EOS)
    nll, count = 0.0, 0.0
    for step in range(BATCHES):
        b = val.batch(step)
        logits = np.asarray(model(b["inputs"], b["positions"], b["segment_ids"])[0], np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        target_log_p = np.take_along_axis(log_p, b["targets"][..., None], -1)[..., 0]
        nll -= (target_log_p * b["loss_mask"]).sum()
        count += b["loss_mask"].sum()
    return float(np.exp(nll / count))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(jaxkit config, its exported params, converted config, converted params,
    data directory, data prepare's summary): the data are packed rows of a
    JSONL file prepared with the converted model's tokenizer.json."""
    root = tmp_path_factory.mktemp("eval_params")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text(byte_tokenizer_json())
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": MODEL, "data": {"path": str(root / "tokenizer"),
                                                                "seq_len": 64}}))
    cfg = load_config(config)
    exported = export_params(nnx.state(build_model(cfg, seed=3), nnx.Param), root / "export")
    convert_jaxkit_to_hf(cfg, root / "hf", params=exported)
    converted = convert_hf_to_jaxkit(root / "hf", root / "converted")
    rng = np.random.default_rng(0)
    words = ["def", "return", "x", "+", "1", "class", "self", "import", "ünï", "✓"]
    with (root / "docs.jsonl").open("w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(2, 40)))}) + "\n")
    summary = prepare([root / "docs.jsonl"], root / "data", tokenizer=converted["tokenizer"],
                      seq_len=SEQ_LEN, val_fraction=0.5, progress=False)
    return (str(config), str(exported), converted["config"], converted["params"],
            str(root / "data"), summary)


def test_eval_params_of_exported_and_converted_models(models, capsys):
    config, exported, converted_config, converted_params, data, prepared = models
    assert prepared["val_rows"] >= BATCH and prepared["val_pad_fraction"] < 0.5
    converted = _eval(capsys, converted_config, "--params", converted_params, "--data", data)
    assert converted["params"] == converted_params
    cfg = load_config(converted_config, DATA[1::2])
    assert converted["perplexity"] == pytest.approx(
        _perplexity_by_hand(cfg, converted_params, Path(data)), rel=1e-5)
    assert converted["loss"] == pytest.approx(np.log(converted["perplexity"]), rel=1e-6)
    # the exported original: the same weights, the same perplexity
    original = _eval(capsys, config, "--params", exported, "--data", data)
    assert original["perplexity"] == pytest.approx(converted["perplexity"], rel=1e-5)


def test_eval_params_errors(models, capsys, tmp_path):
    config, exported, converted_config, converted_params, data, _ = models
    with pytest.raises(SystemExit, match=f"^no parameters under {tmp_path / 'none'}$"):
        _eval(capsys, config, "--params", str(tmp_path / "none"), "--data", data)
    # the converted config's data.path holds its tokenizer, not token files
    with pytest.raises(SystemExit, match="^config error: data.path .* holds no token files"):
        main(["eval", converted_config, "--params", converted_params])
    # rows packed for seq_len 31; the converted config's is 64
    with pytest.raises(SystemExit, match="^data error: .* rows packed for seq_len 31, not 64: "
                                         "set data.seq_len=31"):
        main(["eval", converted_config, "--params", converted_params, "--data", data])
    with pytest.raises(SystemExit, match="^config error: train.eval_batches must be >= 1, got 0$"):
        main(["eval", config, "--params", exported, "--batches", "0"])
    with pytest.raises(SystemExit):
        main(["eval", config, "--run-dir", str(tmp_path), "--params", exported])
    assert "argument --params: not allowed with argument --run-dir" in capsys.readouterr().err

"""The metrics sink: JSON lines always, TensorBoard events where tensorboardX is installed."""
import json
import sys

import pytest

from jaxkit.train.metrics_log import MetricsLogger


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_logs_flattened_scalars_to_jsonl_and_tensorboard(tmp_path):
    logger = MetricsLogger(tmp_path)
    flat = logger.log(3, "train", {"loss": 1.5, "moe": {"load": [0.25, 0.75]}, "bad": float("nan")})
    logger.close()
    nan = pytest.approx(float("nan"), nan_ok=True)
    assert flat == {"loss": 1.5, "bad": nan}  # vectors are not scalars
    [rec] = _records(tmp_path)
    assert rec["step"] == 3 and rec["split"] == "train" and rec["moe/load"] == [0.25, 0.75]
    assert rec["bad"] == "nan"  # JSON has no NaN literal
    kinds = _tensorboard_tags(tmp_path / "tensorboard")
    assert kinds == {"train/loss": "simple_value", "train/bad": "simple_value",
                     "train/moe/load": "histo"}


def _tensorboard_tags(folder):
    """tag -> value kind of every summary in the event files (TFRecord framing:
    length, its CRC, the Event proto, its CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    kinds = {}
    for path in folder.iterdir():
        data = path.read_bytes()
        while data:
            (n,) = struct.unpack("<Q", data[:8])
            event = Event.FromString(data[12:12 + n])
            data = data[16 + n:]
            for value in event.summary.value:
                kinds[value.tag] = value.WhichOneof("value")
    return kinds


def test_without_tensorboardx_warns_and_keeps_the_jsonl(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
    with pytest.warns(UserWarning, match="tensorboardX is not installed"):
        logger = MetricsLogger(tmp_path)
    logger.log(1, "eval", {"ce": 2.0})
    logger.close()
    assert _records(tmp_path) == [{"step": 1, "split": "eval", "ce": 2.0}]
    assert not (tmp_path / "tensorboard").exists()


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=False)
    assert logger.log(1, "train", {"loss": 1.0}) == {"loss": 1.0}
    logger.close()
    assert not any(tmp_path.iterdir())

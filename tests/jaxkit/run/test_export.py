"""jaxkit export refuses an existing output before reading any checkpoint."""
import subprocess
import sys


def test_existing_out_is_refused_first(tmp_path):
    (tmp_path / "out").mkdir()
    # no run exists either: the output is checked before the run is looked for
    out = subprocess.run([sys.executable, "-m", "jaxkit.cli", "export", "configs/quickstart.yaml",
                          "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stderr.strip() == f"output directory '{tmp_path / 'out'}' already exists; name a new one"
    assert not (tmp_path / "run").exists()

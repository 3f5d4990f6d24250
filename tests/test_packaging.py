"""Files the packages read at run time beside their modules ship in the wheel:
every non-Python file under jaxkit/ and pallas_kernels/ matches a
[tool.setuptools.package-data] pattern of pyproject.toml."""
import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_package_data_covers_every_data_file():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"].get("package-data", {})
    for package in ("jaxkit", "pallas_kernels"):
        base = ROOT / package
        data = [p.relative_to(base).as_posix() for p in base.rglob("*")
                if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
        missing = [f for f in data
                   if not any(fnmatch.fnmatch(f, pat) for pat in patterns.get(package, []))]
        assert not missing, f"{package} data files not in package-data: {missing}"

"""The package as a user installs it: a wheel built from this checkout,
installed into a fresh virtual environment that sees this interpreter's
packages (a .pth file; --system-site-packages would only reach the base
interpreter's, not this virtual environment's), so nothing is downloaded;
then used from outside the clone."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What pyproject.toml's build reads (the package, its data, the metadata files).
BUILD_INPUTS = ("pyproject.toml", "README.md", "requirements.txt", "focusft_jax", "configs")


def _run(cmd, cwd, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_wheel_installs_and_its_commands_run_outside_the_clone(tmp_path):
    # Built from a copy of what the build reads: setuptools writes build/ and
    # *.egg-info beside the sources, and a stale build/lib would end up in the wheel.
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    # --no-build-isolation: the build uses this environment's setuptools (no index needed)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
          src], cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("focusft_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "focusft_jax").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel (pyproject.toml's packages): {sorted(modules - names)}"
    assert {"focusft_jax/configs/tiny.yaml", "focusft_jax/evaluation/benchmarks/babilong.json",
            "focusft_jax/evaluation/benchmarks/ruler.json"} <= names
    assert not any(n.split("/")[0] in ("eval", "tests", "configs", "bench") for n in names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    venv_site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip()
    # after the venv's own site-packages on sys.path: the installed wheel wins over any other focusft_jax
    Path(venv_site, "outer_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], cwd=tmp_path)

    work = tmp_path / "elsewhere"  # cwd outside the clone: the import must come from the installed wheel
    work.mkdir()
    where = _run([python, "-c", "import focusft_jax.evaluation.manifest as m, focusft_jax; "
                  "print(focusft_jax.__file__); print(m.load_benchmark('ruler') is not None); "
                  "print(m.git_commit(), m.package_version('focusft-jax'))"], cwd=work)
    imported_from, benchmark, recorded = where.splitlines()
    assert str(venv) in imported_from and benchmark == "True"
    assert recorded.startswith("None ") and recorded != "None None"  # an evaluation's manifest: version, no commit
    # the trainer's closing summary names the installed command, not the clone's `python -m eval.babilong`
    code = "from focusft_jax.job import evaluation_command; print(evaluation_command('babilong'))"
    assert _run([python, "-c", code], cwd=work).strip() == "focusft-babilong"
    assert "--help-config" in _run([bin_dir / "focusft-train", "--help"], cwd=work)
    assert "model.init.hidden_size" in _run([bin_dir / "focusft-train", "--help-config"], cwd=work)
    for tool in ("babilong", "ruler", "generate"):
        assert "--checkpoint" in _run([bin_dir / f"focusft-{tool}", "--help"], cwd=work)
    # the shipped config, by name, from the installed package
    code = "from focusft_jax.config import resolve_config_path; print(resolve_config_path('tiny'))"
    shipped = _run([python, "-c", code], cwd=work)
    assert shipped.strip().startswith(str(venv))

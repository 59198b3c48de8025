"""Packaging, the README's commands and the demo."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert m, f"README.md has no ```bash block after <!-- {marker} -->"
    return m.group(1).strip()


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    main = readme_command("main-command")
    test = readme_command("test-command")
    assert "crossattn.bench --quick" in main and "pytest" in test
    out = subprocess.run(
        ["bash", "-c", "awk '/<!-- test-command -->/ {found=1; next} found && /^```/ "
         "{if (inside) exit; inside=1; next} inside {print}' README.md"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert out == test  # the extraction .ci/run performs
    assert "awk '/<!-- test-command -->/" in (ROOT / ".ci" / "run").read_text()


def test_kernels_are_the_crossattn_kernels_subpackage():
    import crossattn.kernels

    assert Path(crossattn.kernels.__file__).parent.name == "kernels"


def test_the_checkout_does_not_shadow_a_top_level_kernels_package(tmp_path):
    # Hugging Face's `kernels` (imported by transformers >= 5 models) has the name of this
    # checkout's Triton folder; Python run in the checkout (`python -m pytest`) finds the folder
    # first. A stand-in package later on the path must be what `import kernels` gives -- also
    # when the checkout is on the path twice (a symlink) or another checkout's copy of the
    # folder comes first (each copy must not hand over to the other forever).
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'the other kernels'\nfrom .sub import X\n")
    (site / "kernels" / "sub.py").write_text("X = 42\n")
    (tmp_path / "link").symlink_to(ROOT, target_is_directory=True)
    (tmp_path / "copy" / "kernels").mkdir(parents=True)
    shutil.copy(ROOT / "kernels" / "__init__.py", tmp_path / "copy" / "kernels" / "__init__.py")
    code = ("import kernels, kernels.sub; from kernels import X, WHO; import crossattn.kernels.xattn_configs as c; "
            "print(WHO == 'the other kernels', X, kernels.sub.__file__, c.__name__, "
            "hasattr(kernels, '__crossattn_passed_over__'))")
    base = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # '' (the checkout) first on sys.path
    for before in ([], [tmp_path / "link"], [tmp_path / "copy"]):
        env = dict(base, PYTHONPATH=os.pathsep.join(str(p) for p in [*before, site]))
        res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert res.returncode == 0, (before, res.stderr[-2000:])
        assert res.stdout.split() == ["True", "42", str(site / "kernels" / "sub.py"),
                                      "crossattn.kernels.xattn_configs", "False"], before
    # Without another package of the name, the folder stays importable as it was.
    res = subprocess.run([sys.executable, "-S", "-c", "import kernels; print(kernels.__file__)"], cwd=ROOT,
                         env=dict(base, PYTHONPATH=""), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == ROOT / "kernels" / "__init__.py"


def _can_build_wheels_offline() -> bool:
    try:
        import setuptools  # noqa: F401  (setuptools >= 70.1 carries bdist_wheel itself)
    except ImportError:
        return False
    return (importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
            or importlib.util.find_spec("wheel") is not None)


@pytest.mark.slow
@pytest.mark.skipif(not _can_build_wheels_offline(), reason="needs setuptools with bdist_wheel")
def test_wheel_installs_only_crossattn_and_never_pins_torch(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("crossattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"crossattn"}
    assert "crossattn/kernels/__init__.py" in names
    assert "crossattn/reference.py" in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    core = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert core == ["Requires-Dist: torch>=2.11"]  # no Triton: CUDA torch brings it, the CPU needs an extra
    assert "License-Expression: Apache-2.0" in meta
    assert "crossattn/py.typed" in names and any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    scripts = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for line in ("crossattn-bench = crossattn._cli:bench", "crossattn-train = crossattn.train:main",
                 "crossattn-attention-map = crossattn.attention_map:main"):
        assert line in scripts, scripts
    import torch

    if torch.version.cuda is None:  # no CUDA torch: the extension is skipped unless forced
        assert not [n for n in names if n.startswith("crossattn/_C")]


@pytest.mark.slow
@pytest.mark.skipif(not _can_build_wheels_offline() or shutil.which("nvcc") is None,
                    reason="needs setuptools with bdist_wheel and nvcc")
def test_wheel_with_the_cuda_extension(tmp_path):
    """CROSSATTN_FORCE_CUDA=1 builds crossattn._C even here (CPU-only torch): a stable-ABI
    library that links no PyTorch or CUDA runtime library and resolves PyTorch's C shim at
    load time. Installed, the package still imports; the backend explains why it cannot run."""
    env = {**os.environ, "CROSSATTN_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "8.6"}
    env.pop("CROSSATTN_SKIP_CUDA_BUILD", None)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    (wheel,) = tmp_path.glob("crossattn-*.whl")
    zf = zipfile.ZipFile(wheel)
    (lib,) = [n for n in zf.namelist() if n.startswith("crossattn/_C") and n.endswith(".so")]
    site = tmp_path / "site"
    zf.extractall(site)
    needed = subprocess.run(["readelf", "-d", str(site / lib)], capture_output=True, text=True).stdout
    assert "NEEDED" in needed
    for forbidden in ("libtorch", "libc10", "libcudart"):
        assert forbidden not in needed, needed
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(site / lib)], capture_output=True,
                               text=True).stdout
    assert "aoti_torch_get_current_cuda_stream" in undefined
    assert "_ZN3c10" not in undefined and "_ZN2at" not in undefined  # no C++ ABI of PyTorch
    probe = ("import torch, crossattn, crossattn._cuda as c\n"
             "print(crossattn.available_backends()['cuda'])\n"
             "try:\n    c.load_extension()\n    print('loaded')\n"
             "except RuntimeError as e:\n    print('refused:', e)\n")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "is not built" not in res.stdout
    import torch

    if torch.version.cuda is None:
        assert "no CUDA device" in res.stdout and "built but does not load into this PyTorch" in res.stdout


def _source_files() -> list[str]:
    """The files of this source tree: git's list in a checkout, else (an unpacked sdist) a walk."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]
    else:
        skip = {"__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks", "build", "dist"}
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)
                 and p.suffix not in (".pyc", ".so") and p.name != "PKG-INFO" and p.name != "setup.cfg"]
    return sorted(set(files) | {"LICENSE", "MANIFEST.in", "crossattn/py.typed"})


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="needs the build package (crossattn[test])")
def test_sdist_holds_everything_to_build_test_and_benchmark(tmp_path):
    """The source release is the repository: CUDA sources, kernels, every test with its helpers,
    benchmarks and their results, tools, LICENSE; nothing built, no local link."""
    src = tmp_path / "src"
    files = _source_files()
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    res = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path / "dist")],
                         cwd=src, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (sdist,) = (tmp_path / "dist").glob("crossattn-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
        pkg_info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO"))).read().decode()
    members = set(names)
    expected = {f for f in files if f != ".gitignore"}
    assert expected - members == set(), "missing from the sdist"
    for needed in ("LICENSE", "README.md", "setup.py", "pyproject.toml", "tests/conftest.py",
                   "tests/_kernel_compile.py", "benchmarks/test_attention.py", "tools/gpu_session.sh"):
        assert needed in members, needed
    assert any(n.startswith("csrc/") and n.endswith(".cu") for n in members)
    assert not [n for n in members if "__pycache__" in n or n.endswith((".pyc", ".so"))]
    assert not [n for n in members if n.startswith("crossattn/kernels/")]  # only kernels/, mapped at build time
    assert "License-Expression: Apache-2.0" in pkg_info


def test_demo_runs_and_agrees_with_the_reference(tmp_path):
    res = subprocess.run([sys.executable, "-m", "crossattn.demo", "--repeats", "1", "--timestamp-steps", "5",
                          "--corpus-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "max |crossattn - float64 reference|" in res.stdout
    assert "eager" in res.stdout and "monotone: True" in res.stdout
    assert "true start" in res.stdout and "mean |boundary error|" in res.stdout

"""Shared behaviour of the console scripts: a missing optional dependency, a missing file or
an unusable device is one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

# Third-party modules each extra brings, as the CLIs import them.
EXTRAS = {
    "models": ("numpy", "transformers", "tqdm", "matplotlib"),
    "bench": ("matplotlib",),
}


def fail(prog: str, message: str) -> SystemExit:
    """``raise fail(prog, msg)``: the one-line error and exit status 2 of argparse."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return SystemExit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: ``prog: error: message (--help for usage)``, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def require_extra(prog: str, extra: str, modules: tuple[str, ...] | None = None) -> None:
    """Exit 2 naming the extra to install when one of its modules is not importable."""
    missing = [m for m in (modules or EXTRAS[extra]) if importlib.util.find_spec(m) is None]
    if missing:
        raise fail(prog, f"{', '.join(missing)} not installed: pip install 'crossattn[{extra}]'")


def existing_file(prog: str, option: str, path: str | None) -> None:
    """Exit 2 unless ``path`` (given as ``option``) is None or a readable file."""
    if path is not None and not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        raise fail(prog, f"{option} {path}: {what}")


def check_device(prog: str, device: str):
    """The torch.device for ``--device``, or exit 2 saying why it cannot be used here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise fail(prog, f"--device {device!r}: {str(exc).splitlines()[0]}") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise fail(prog, f"--device {device}: this PyTorch ({torch.__version__}) is built without CUDA; "
                             "install a CUDA build of torch or use --device cpu")
        if not torch.cuda.is_available():
            raise fail(prog, f"--device {device}: no CUDA device is visible (check the driver and "
                             "CUDA_VISIBLE_DEVICES) — use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise fail(prog, f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise fail(prog, f"--device {device}: expected cpu or cuda[:N]")
    return dev


def bench(argv=None) -> int:
    """``crossattn-bench``: the benchmark CLI, or a one-line "install crossattn[bench]"."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not {"-h", "--help"} & set(argv):
        require_extra("crossattn-bench", "bench")
    from crossattn.bench.__main__ import main

    return main(argv)

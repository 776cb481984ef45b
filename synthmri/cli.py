"""`synthmri` command: a thin dispatcher to the sub-command modules.

Each sub-command lives in its own module with `main(argv) -> int`; it is imported
only when used, so `synthmri generate` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("synthmri.stack", "start Redis, a worker and the API on localhost with the demo model"),
    "sample": ("worker.sample_cli", "sample a checkpoint locally into NIfTI/PNG files"),
    "generate": ("synthmri.generate_cli", "request samples from a running service and download them"),
    "train": ("training.train", "train a model (single process; use torchrun for DDP)"),
    "phantoms": ("training.phantoms_cli", "write BraTS-like phantom subjects"),
    "prepare": ("training.prepare_cli", "preprocess a BraTS folder into the slice cache"),
    "demo-model": ("training.demo", "train the demo model the service ships with"),
    "eval": ("training.evaluation.cli", "evaluate a checkpoint's samples against real held-out slices"),
    "export-nnunet": ("training.export_nnunet", "jobs (and real BraTS cases) as an nnU-Net v2 raw dataset"),
}


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a single line and exits with 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser(command: str, description: str | None = None) -> OneLineArgumentParser:
    return OneLineArgumentParser(prog=f"synthmri {command}", description=description)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(len(c) for c in COMMANDS)
        lines = [f"  {c.ljust(width)}  {help_}" for c, (_, help_) in COMMANDS.items()]
        print("usage: synthmri COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from synthmri import __version__

        print(f"synthmri {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"synthmri: error: unknown command {command!r} (try: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except CliError as e:
        print(f"synthmri {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"synthmri {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Under `python -m` this file runs as __main__; sub-commands import synthmri.cli, so
    # dispatch through that module to share one CliError class.
    from synthmri.cli import main as _main

    raise SystemExit(_main())

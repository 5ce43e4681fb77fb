"""What every command-line tool shares: one-line errors and an argument parser that gives them.

A command that fails because of its input prints exactly one line, `error: <problem and fix>`,
on stderr and exits non-zero; a traceback means a bug in vit_jax.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

# Failures caused by the input (settings, files, data), reported as one line; anything else is a bug.
INPUT_ERRORS = (ValueError, OSError, KeyError, UnicodeError)


def one_line(e: BaseException | str) -> str:
  """The message of `e` on one line (multi-line details joined with '; ')."""
  text = str(e)
  if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
    text = e.args[0]  # str() of a KeyError quotes it
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    text = f"{e.filename}: {e.strerror}"
  parts = [" ".join(line.split()) for line in text.splitlines()]
  return "; ".join(p for p in parts if p) or type(e).__name__


def fail(e: BaseException | str, status: int = 1) -> int:
  """Print `error: ...` for `e` on stderr; returns `status` for `sys.exit`."""
  print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
  return status


class ArgumentParser(argparse.ArgumentParser):
  """argparse, with a usage error as one `error:` line (the usage is under --help)."""

  def error(self, message: str) -> NoReturn:
    self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")

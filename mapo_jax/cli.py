"""The command-line tools' parser (encode, export, generate, evaluate, make_pairs, relabel).

Plain argparse with the tools' dashed names, apart from absl's global flags: absl's argparse_flags parser would
inherit every absl flag defined in the process, so a tool's option collides with another module's flag of the
same name once both are imported (`mapo_jax.aot --text` and `encode --text`). absl.app.run still needs its FLAGS
marked parsed, which `parse` does.
"""
from __future__ import annotations

import argparse

from absl import flags


def parser(doc: str | None) -> argparse.ArgumentParser:
  return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
  args = p.parse_args(argv[1:])
  flags.FLAGS.mark_as_parsed()
  return args

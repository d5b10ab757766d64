"""MkDocs hooks.

* The ``persia`` command's help, from its own argparse parser, goes into the command-line
  reference (``<!-- persia-help: SUBCOMMAND -->`` markers), so it cannot go stale.
* A link from a guide to a file of the repository outside ``docs/`` (``../benchmarks/README.md``)
  becomes the file's path in the repository; a link to a file that does not exist fails the build.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

_MARKER = re.compile(r"<!-- persia-help:\s*([a-z-]*)\s*-->")
_OUTSIDE = re.compile(r"\[([^\]]+)\]\((\.\./[^)#\s]+)(#[^)\s]*)?\)")


def _help(command: str) -> str:
    from persia.cli.main import build_parser

    parser = build_parser()
    if command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[command]
    return parser.format_help()


def _outside(page: Any, config: Any, m: re.Match[str]) -> str:
    here = Path(config["docs_dir"]) / Path(page.file.src_path).parent
    target = (here / m.group(2)).resolve()
    docs = Path(config["docs_dir"]).resolve()
    if docs in target.parents:  # a page of the site: MkDocs checks it
        return m.group(0)
    root = docs.parent
    if not target.exists() or root not in target.parents:
        raise ValueError(f"{page.file.src_path}: link to {m.group(2)!r}: no such file")
    return f"{m.group(1)} (`{target.relative_to(root).as_posix()}` in the repository)"


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    markdown = _MARKER.sub(
        lambda m: "```text\n" + _help(m.group(1)).rstrip() + "\n```", markdown
    )
    return _OUTSIDE.sub(lambda m: _outside(page, config, m), markdown)

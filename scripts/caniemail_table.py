#!/usr/bin/env python3
"""Write src/mailpipe/checks/data/caniemail.json, the HTML check's table of facts (feature by
email client), from the `caniemail` npm package's support data.

    python scripts/caniemail_table.py                 # npm-installs caniemail into build/
    python scripts/caniemail_table.py --from data.json  # or reads a caniemail.json given

The table keeps, per feature, what the check shows (title, description, category, tags, URL,
notes) and the support facts (family -> platform -> version -> "y" | "n" | "a" | "u", with
" #N" naming a note); caniemail's test URLs and dates are left out. Descriptions and notes
are markdown there and HTML here, as Mailpit's html-check answers them (raw HTML in the
markdown is escaped, links open in a new tab)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "src" / "mailpipe" / "checks" / "data" / "caniemail.json"
BUILD = ROOT / "build" / "caniemail"
_MD = MarkdownIt("commonmark", {"html": False})


def npm_data(spec: str) -> tuple[dict[str, Any], str]:
    """caniemail's JSON and the package version, npm-installed under build/ (gitignored)."""
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("npm is not installed: install Node, or pass --from caniemail.json")
    BUILD.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(BUILD), spec],
                   check=True)
    package = BUILD / "node_modules" / "caniemail"
    version = json.loads((package / "package.json").read_text())["version"]
    return json.loads((package / "data" / "caniemail.json").read_text()), version


def inline_html(markdown: str | None) -> str:
    html = _MD.renderInline(markdown or "").strip()
    return html.replace("<a href=", '<a target="_blank" rel="noopener" href=')


def feature(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "slug": entry["slug"],
        "title": entry["title"],
        "description": inline_html(entry.get("description")),
        "category": entry["category"],
        "tags": list(entry.get("tags") or []),
        "keywords": entry.get("keywords") or "",
        "url": entry["url"],
        "notes": {num: inline_html(note)
                  for num, note in sorted((entry.get("notes_by_num") or {}).items())},
        "support": entry["stats"],
    }


def table(data: dict[str, Any], version: str) -> dict[str, Any]:
    names = data["nicenames"]
    return {
        "source": {"package": "caniemail", "version": version,
                   "api_version": data.get("api_version"),
                   "last_update_date": data.get("last_update_date")},
        "families": names["family"],
        "platforms": names["platform"],
        "features": sorted((feature(entry) for entry in data["data"]),
                           key=lambda f: f["slug"]),
    }


def write(result: dict[str, Any]) -> None:
    # One feature a line: a refresh shows as a readable diff.
    head = {key: value for key, value in result.items() if key != "features"}
    lines = [json.dumps(head, ensure_ascii=False, sort_keys=True)[:-1] + ', "features": [']
    features = [json.dumps(f, ensure_ascii=False, sort_keys=True) for f in result["features"]]
    lines.append(",\n".join(features))
    lines.append("]}")
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", type=Path,
                        help="a caniemail.json to read instead of installing the package")
    parser.add_argument("--package", default="caniemail@latest", help="npm package spec")
    args = parser.parse_args()
    if args.source:
        data, version = json.loads(args.source.read_text()), "local file"
    else:
        data, version = npm_data(args.package)
    write(table(data, version))
    print(f"wrote {OUT.relative_to(ROOT)}: {len(data['data'])} features (caniemail {version})")


if __name__ == "__main__":
    main()

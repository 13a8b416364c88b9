"""The HTML check: which caniemail features an email's HTML uses (scan.py) and how well the
email clients support them, scored as Mailpit scores them. Sans-I/O.

`mailpit_html_check()` answers exactly the shape of Mailpit's
`GET /api/v1/message/{ID}/html-check` (Total, Warnings, Platforms); `html_check()`, which
mailpipe's own route answers, is the same plus two fields Mailpit's clients ignore: each
warning's `Lines` and a per client family summary, `Families`.

Scoring (Mailpit's): a feature's Score is the share of caniemail's results (one per family,
platform and client version) that say supported ("y"), unsupported ("n") or anything else
(partial: "a", "u", or a value with a note). The total weighs each found feature's partial
and unsupported shares by how many times it is used per element of the document, and takes
the worst feature's: Total.Unsupported is the largest `Unsupported * Found / Nodes`, and so
for Partial (both capped so that they add up to 100 at most); Supported is what remains.
"""

from __future__ import annotations

import re
from typing import Any

from mailpipe.checks.scan import features
from mailpipe.checks.table import Table, caniemail

_NOTE = re.compile(r"#(\d+)")


def html_check(html: str) -> dict[str, Any]:
    """The check in Mailpit's shape plus `Lines` per warning and `Families`."""
    table = caniemail()
    found, nodes = features(html, table.features)
    warnings = [_warning(table, slug, lines) for slug, lines in found.items()]
    nodes = max(nodes, 1)  # a fragment of text only still divides by something
    partial = max((_weighted(w, "Partial", nodes) for w in warnings), default=0.0)
    unsupported = max((_weighted(w, "Unsupported", nodes) for w in warnings), default=0.0)
    # A feature used more often than there are elements (units, say) would weigh over 100%.
    unsupported = min(unsupported, 100.0)
    partial = min(partial, 100.0 - unsupported)
    warnings.sort(key=lambda w: (-(_weighted(w, "Partial", nodes)
                                   + _weighted(w, "Unsupported", nodes)), w["Slug"]))
    return {
        "Total": {
            "Nodes": nodes,
            "Tests": len(table.features),
            "Supported": _round(100 - partial - unsupported),
            "Partial": _round(partial),
            "Unsupported": _round(unsupported),
        },
        "Warnings": warnings,
        "Platforms": platforms(table),
        "Families": _families(table, warnings),
    }


def mailpit_html_check(html: str) -> dict[str, Any]:
    """Exactly Mailpit's HTMLCheckResponse: no field it does not have."""
    result = html_check(html)
    result.pop("Families")
    for warning in result["Warnings"]:
        warning.pop("Lines")
    return result


def platforms(table: Table) -> dict[str, list[str]]:
    """Platform -> the names of the client families tested on it (Mailpit's `Platforms`)."""
    found: dict[str, set[str]] = {}
    for feature in table.features.values():
        for family, by_platform in feature["support"].items():
            for platform in by_platform:
                found.setdefault(platform, set()).add(table.families.get(family, family))
    return {platform: sorted(names) for platform, names in sorted(found.items())}


def _warning(table: Table, slug: str, lines: list[int]) -> dict[str, Any]:
    feature = table.features[slug]
    results = list(_results(table, feature))
    counts = {"yes": 0, "no": 0, "partial": 0}
    for result in results:
        counts[result["Support"]] += 1
    total = max(len(results), 1)
    return {
        "Slug": slug,
        "Title": feature["title"],
        "Description": feature["description"],
        "URL": feature["url"],
        "Category": feature["category"],
        "Tags": feature["tags"],
        "Keywords": feature["keywords"],
        "Results": results,
        "NotesByNumber": feature["notes"],
        "Score": {
            "Found": len(lines),
            "Supported": _round(counts["yes"] / total * 100),
            "Partial": _round(counts["partial"] / total * 100),
            "Unsupported": _round(counts["no"] / total * 100),
        },
        "Lines": lines,
    }


def _results(table: Table, feature: dict[str, Any]) -> Any:
    for family, by_platform in feature["support"].items():
        for platform, by_version in by_platform.items():
            for version, value in by_version.items():
                note = _NOTE.search(value)
                yield {
                    "Name": f"{table.families.get(family, family)} "
                            f"{table.platforms.get(platform, platform)} ({version})",
                    "Platform": platform,
                    "Family": family,
                    "Version": version,
                    "Support": {"y": "yes", "n": "no"}.get(value, "partial"),
                    "NoteNumber": note.group(1) if note else "",
                }


def _families(table: Table, warnings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per client family: the average, over the features found that it was tested for, of
    its results' supported / partial / unsupported shares (every version and platform)."""
    shares: dict[str, list[tuple[float, float, float]]] = {}
    for warning in warnings:
        by_family: dict[str, list[str]] = {}
        for result in warning["Results"]:
            by_family.setdefault(result["Family"], []).append(result["Support"])
        for family, supports in by_family.items():
            n = len(supports)
            shares.setdefault(family, []).append(
                (supports.count("yes") / n, supports.count("partial") / n,
                 supports.count("no") / n))
    summary = []
    for family, rows in shares.items():
        count = len(rows)
        summary.append({
            "Family": family,
            "Name": table.families.get(family, family),
            "Features": count,
            "Supported": _round(sum(r[0] for r in rows) / count * 100),
            "Partial": _round(sum(r[1] for r in rows) / count * 100),
            "Unsupported": _round(sum(r[2] for r in rows) / count * 100),
        })
    return sorted(summary, key=lambda s: (-s["Unsupported"] - s["Partial"], s["Name"]))


def _weighted(warning: dict[str, Any], share: str, nodes: int) -> float:
    return float(warning["Score"][share]) * warning["Score"]["Found"] / nodes


def _round(value: float) -> float:
    return round(value, 2)

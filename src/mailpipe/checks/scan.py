"""Which caniemail features an HTML email uses, and on which lines. Sans-I/O.

The HTML is tokenized by the stdlib's html.parser (start tags, attributes, comments, the
doctype, each with its line); CSS, from style attributes and <style> blocks alike, by
tinycss2 (declarations, values, at-rules, selectors, each with its line). Every rule below
maps what was found to a caniemail slug; a slug the shipped table lacks is never reported.
Lines count from 1 in the HTML body as decoded from the email.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser

import tinycss2
from tinycss2 import ast

from mailpipe.web.htmlview import _srcset_candidates as srcset_candidates

Attrs = dict[str, str]


@dataclass
class Element:
    tag: str
    attrs: Attrs
    line: int


@dataclass
class Document:
    elements: list[Element] = field(default_factory=list)
    inline_styles: list[tuple[str, int]] = field(default_factory=list)  # (css, line)
    sheets: list[tuple[str, int]] = field(default_factory=list)  # <style> text, first line
    comments: list[int] = field(default_factory=list)
    doctype: int | None = None
    body_end: bool = False  # a </body>: a whole document, not a fragment


class _Scanner(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.doc = Document()
        self.in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        line = self.getpos()[0]
        values = {name: value or "" for name, value in attrs}
        self.doc.elements.append(Element(tag, values, line))
        if "style" in values:
            self.doc.inline_styles.append((values["style"], line))
        self.in_style = tag == "style"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        self.in_style = False

    def handle_endtag(self, tag: str) -> None:
        self.in_style = False
        self.doc.body_end = self.doc.body_end or tag == "body"

    def handle_data(self, data: str) -> None:
        if self.in_style:
            self.doc.sheets.append((data, self.getpos()[0]))

    def close(self) -> None:
        # A <style> never closed holds the rest of the document, as a browser reads it;
        # Python 3.11's parser would drop that text silently.
        if self.in_style and self.rawdata:
            self.doc.sheets.append((self.rawdata, self.getpos()[0]))
            self.rawdata = ""
        super().close()

    def handle_comment(self, data: str) -> None:
        self.doc.comments.append(self.getpos()[0])

    def handle_decl(self, decl: str) -> None:
        if decl.lower().startswith("doctype") and self.doc.doctype is None:
            self.doc.doctype = self.getpos()[0]


def scan(html: str) -> Document:
    scanner = _Scanner()
    scanner.feed(html)
    scanner.close()
    return scanner.doc


# ---- HTML: elements and attributes ----------------------------------------------------------


def _typed(tag: str, kind: str) -> Callable[[Element], bool]:
    return lambda el: el.tag == tag and el.attrs.get("type", "").strip().lower() == kind


def _href(prefix: str) -> Callable[[Element], bool]:
    return lambda el: el.tag == "a" and el.attrs.get("href", "").strip().lower().startswith(prefix)


# Elements whose slug is html-<tag>.
_PLAIN_TAGS = (
    "abbr", "acronym", "address", "audio", "base", "bdi", "blockquote", "body", "code", "del",
    "dfn", "dialog", "div", "form", "hr", "img", "link", "marquee", "meter", "p", "picture",
    "pre", "progress", "rp", "rt", "ruby", "select", "small", "span", "strike", "strong",
    "style", "svg", "table", "textarea", "video", "wbr",
)
# Attributes whose slug is html-<attribute>.
_PLAIN_ATTRS = (
    "align", "background", "cellpadding", "cellspacing", "dir", "height", "hidden", "lang",
    "popover", "required", "role", "srcset", "target", "valign", "width",
    "aria-describedby", "aria-hidden", "aria-label", "aria-labelledby", "aria-live",
)
# Looked up by tag and by attribute name: an email of 100,000 elements is read in a moment.
TAG_SLUGS: dict[str, tuple[str, ...]] = {
    **{tag: (f"html-{tag}",) for tag in _PLAIN_TAGS},
    **{f"h{n}": ("html-h1-h6",) for n in range(1, 7)},
    **{tag: ("html-lists",) for tag in ("ul", "ol", "dl")},
    **{tag: ("html-object",) for tag in ("object", "embed")},
    **{tag: ("html-semantics",) for tag in (
        "article", "aside", "details", "figcaption", "figure", "footer", "header", "main",
        "mark", "nav", "section", "summary", "time")},
    "map": ("html-image-maps",),
}
ATTR_SLUGS: dict[str, tuple[str, ...]] = {
    **{name: (f"html-{name}",) for name in _PLAIN_ATTRS},
    "loading": ("html-loading-attribute",),
    "inert": ("css-inert-attribute",),
}
# What neither a tag nor an attribute name alone tells.
SPECIAL_RULES: dict[str, Callable[[Element], bool]] = {
    "html-image-maps": lambda el: el.tag == "img" and "usemap" in el.attrs,
    "html-anchor-links": _href("#"),
    "html-mailto-links": _href("mailto:"),
    "html-meta-color-scheme": lambda el: el.tag == "meta" and el.attrs.get("name", "").lower()
    in ("color-scheme", "supported-color-schemes"),
    "html-input-checkbox": _typed("input", "checkbox"),
    "html-input-hidden": _typed("input", "hidden"),
    "html-input-radio": _typed("input", "radio"),
    "html-input-reset": _typed("input", "reset"),
    "html-input-submit": _typed("input", "submit"),
    "html-input-text": _typed("input", "text"),
    "html-button-reset": _typed("button", "reset"),
    "html-button-submit": _typed("button", "submit"),
    "amp": lambda el: el.tag == "html" and bool({"amp4email", "⚡4email"} & set(el.attrs)),
}
_SPECIAL_TAGS = frozenset({"img", "a", "meta", "input", "button", "html"})

# Image formats by file extension (of img src and srcset URLs).
_IMAGE_EXTENSIONS = {
    "apng": "image-apng", "avif": "image-avif", "bmp": "image-bmp", "gif": "image-gif",
    "hdr": "image-hdr", "heif": "image-heif", "heic": "image-heif", "ico": "image-ico",
    "jpg": "image-jpg", "jpeg": "image-jpg", "mp4": "image-mp4", "png": "image-png",
    "svg": "image-svg", "tif": "image-tiff", "tiff": "image-tiff", "webp": "image-webp",
}
_EXTENSION = re.compile(r"\.([a-z0-9]+)$")


def _image_format(url: str) -> str | None:
    url = url.strip()
    if url.lower().startswith("data:image/"):
        return "image-base64"
    path = re.split(r"[?#]", url, maxsplit=1)[0].lower()
    match = _EXTENSION.search(path)
    return _IMAGE_EXTENSIONS.get(match.group(1)) if match else None


def _html_features(doc: Document, found: defaultdict[str, list[int]]) -> None:
    for el in doc.elements:
        slugs = list(TAG_SLUGS.get(el.tag, ()))
        for name in el.attrs:
            slugs += ATTR_SLUGS.get(name, ())
        if el.tag in _SPECIAL_TAGS:
            slugs += [slug for slug, rule in SPECIAL_RULES.items() if rule(el)]
        for slug in slugs:
            found[slug].append(el.line)
        if el.tag == "img":
            urls = [el.attrs.get("src", "")]
            urls += [url for url, _ in srcset_candidates(el.attrs.get("srcset", ""))]
            for slug in {_image_format(url) for url in urls if url}:
                if slug:
                    found[slug].append(el.line)
    found["html-comments"].extend(doc.comments)
    if doc.doctype is not None:
        found["html-doctype"].append(doc.doctype)


# ---- CSS: declarations, values, at-rules, selectors -----------------------------------------

# Properties whose slug is not css-<property> (those that are need no entry).
_PROPERTY_SLUGS = {
    "border-inline": "css-border-inline-block", "border-block": "css-border-inline-block",
    "block-size": "css-block-inline-size",
    "top": "css-left-right-top-bottom", "right": "css-left-right-top-bottom",
    "bottom": "css-left-right-top-bottom", "left": "css-left-right-top-bottom",
    "margin-inline": "css-margin-inline-block", "margin-block": "css-margin-inline-block",
    "padding-inline": "css-padding-inline-block", "padding-block": "css-padding-inline-block",
    "text-emphasis-style": "css-text-emphasis", "text-emphasis-color": "css-text-emphasis",
    "columns": "css-column-layout-properties",
}
_PROPERTY_PATTERNS = (
    (re.compile(r"^border-(inline|block)-(start|end)$"), "css-border-inline-block-individual"),
    (re.compile(r"^border-(inline|block)-(start|end)-(color|style|width)$"),
     "css-border-inline-block-longhand"),
    (re.compile(r"^border-(start|end)-(start|end)-radius$"), "css-border-radius-logical"),
    (re.compile(r"^margin-block-(start|end)$"), "css-margin-block-start-end"),
    (re.compile(r"^margin-inline-(start|end)$"), "css-margin-inline-start-end"),
    (re.compile(r"^padding-block-(start|end)$"), "css-padding-block-start-end"),
    (re.compile(r"^padding-inline-(start|end)$"), "css-padding-inline-start-end"),
    (re.compile(r"^column-(?!count$)"), "css-column-layout-properties"),
    (re.compile(r"^grid-template-"), "css-grid-template"),
    (re.compile(r"^scroll-snap-"), "css-scroll-snap"),
    (re.compile(r"^animation-"), "css-animation"),
    (re.compile(r"^transition-"), "css-transition"),
)
_VENDOR = re.compile(r"^-(webkit|moz|ms|o)-")
_FUNCTION_SLUGS = {
    "rgb": "css-rgb", "rgba": "css-rgba", "calc": "css-unit-calc", "var": "css-variables",
    "linear-gradient": "css-linear-gradient", "repeating-linear-gradient": "css-linear-gradient",
    "radial-gradient": "css-radial-gradient", "repeating-radial-gradient": "css-radial-gradient",
    "conic-gradient": "css-conic-gradient", "repeating-conic-gradient": "css-conic-gradient",
    "clamp": "css-function-clamp", "min": "css-function-min", "max": "css-function-max",
    "light-dark": "css-function-light-dark", "lch": "css-modern-color",
    "oklch": "css-modern-color", "lab": "css-modern-color", "oklab": "css-modern-color",
}
_UNITS = frozenset({"ch", "cm", "em", "ex", "in", "mm", "pc", "pt", "px", "rem", "vh", "vmax",
                    "vmin", "vw"})
_KEYWORD_SLUGS = {
    "initial": "css-unit-initial", "fit-content": "css-intrinsic-size",
    "min-content": "css-intrinsic-size", "max-content": "css-intrinsic-size",
    "system-ui": "css-sytem-ui", "ui-serif": "css-sytem-ui", "ui-sans-serif": "css-sytem-ui",
    "ui-rounded": "css-sytem-ui", "ui-monospace": "css-sytem-ui",
}
_DISPLAY_SLUGS = {"flex": "css-display-flex", "inline-flex": "css-display-flex",
                  "grid": "css-display-grid", "inline-grid": "css-display-grid",
                  "none": "css-display-none"}
_AT_RULES = {"font-face": "css-at-font-face", "import": "css-at-import",
             "keyframes": "css-at-keyframes", "-webkit-keyframes": "css-at-keyframes",
             "media": "css-at-media", "supports": "css-at-supports"}
_MEDIA_FEATURES = (
    (re.compile(r"device-pixel-ratio|resolution"), "css-at-media-device-pixel-ratio"),
    (re.compile(r"\(\s*(any-)?hover\b"), "css-at-media-hover"),
    (re.compile(r"\borientation\b"), "css-at-media-orientation"),
    (re.compile(r"prefers-color-scheme"), "css-at-media-prefers-color-scheme"),
    (re.compile(r"prefers-reduced-motion"), "css-at-media-prefers-reduced-motion"),
)
_PSEUDO = re.compile(r"(::?)([a-z-]+)")
_PSEUDO_ELEMENTS = frozenset({"before", "after", "first-letter", "first-line", "marker",
                              "placeholder"})
_NESTED = re.compile(r"\([^()]*\)|\[[^\]]*\]|\"[^\"]*\"|'[^']*'")


def property_slug(name: str, known: Iterable[str]) -> str | None:
    name = _VENDOR.sub("", name.lower())
    if name.startswith("--"):
        return "css-variables"
    if name in _PROPERTY_SLUGS:
        return _PROPERTY_SLUGS[name]
    for pattern, slug in _PROPERTY_PATTERNS:
        if pattern.search(name):
            return slug
    return f"css-{name}" if f"css-{name}" in known else None


class _Css:
    """Collects CSS features into `found` (slug -> lines); `base` is the HTML line the parsed
    text starts on."""

    def __init__(self, found: defaultdict[str, list[int]], known: Iterable[str]) -> None:
        self.found = found
        self.known = frozenset(known)

    def add(self, slug: str | None, line: int) -> None:
        if slug:
            self.found[slug].append(line)

    def inline(self, css: str, line: int) -> None:
        # A style attribute's lines are not known apart from its tag's: all on the tag's line.
        for node in tinycss2.parse_blocks_contents(css, skip_comments=False,
                                                   skip_whitespace=True):
            self.block_item(node, line, 1, line_of_tag=True)

    def sheet(self, css: str, base: int) -> None:
        rules = tinycss2.parse_stylesheet(css, skip_comments=False, skip_whitespace=True)
        self.rules(rules, base)

    def rules(self, nodes: Iterable[ast.Node], base: int, *, keyframes: bool = False) -> None:
        for node in nodes:
            line = base + node.source_line - 1
            if isinstance(node, ast.Comment):
                self.add("css-comments", line)
            elif isinstance(node, ast.AtRule):
                self.at_rule(node, base, line)
            elif isinstance(node, ast.QualifiedRule):
                if not keyframes:
                    self.selector(tinycss2.serialize(node.prelude), line)
                self.block(node.content, base)

    def at_rule(self, node: ast.AtRule, base: int, line: int) -> None:
        keyword = node.lower_at_keyword
        self.add(_AT_RULES.get(keyword), line)
        prelude = tinycss2.serialize(node.prelude).lower()
        if keyword == "media":
            for pattern, slug in _MEDIA_FEATURES:
                if pattern.search(prelude):
                    self.add(slug, line)
        if node.content is None:
            return
        if keyword in ("media", "supports", "document", "layer", "container"):
            self.rules(tinycss2.parse_rule_list(node.content, skip_comments=False,
                                                skip_whitespace=True), base)
        elif keyword.endswith("keyframes"):
            self.rules(tinycss2.parse_rule_list(node.content, skip_whitespace=True), base,
                       keyframes=True)
        else:  # @font-face, @page...: declarations
            self.block(node.content, base)

    def block(self, content: list[ast.Node] | None, base: int) -> None:
        for node in tinycss2.parse_blocks_contents(content or [], skip_comments=False,
                                                   skip_whitespace=True):
            self.block_item(node, base, node.source_line, line_of_tag=False)

    def block_item(self, node: ast.Node, base: int, source_line: int, *,
                   line_of_tag: bool) -> None:
        line = base if line_of_tag else base + source_line - 1
        if isinstance(node, ast.Declaration):
            self.declaration(node, line)
        elif isinstance(node, ast.Comment):
            self.add("css-comments", line)
        elif isinstance(node, ast.QualifiedRule) and not line_of_tag:
            self.add("css-nesting", line)  # a style rule inside a style rule
            self.selector(tinycss2.serialize(node.prelude), line)
            self.block(node.content, base)
        elif isinstance(node, ast.AtRule) and not line_of_tag:
            self.at_rule(node, base, line)

    def declaration(self, decl: ast.Declaration, line: int) -> None:
        name = decl.lower_name
        self.add(property_slug(name, self.known), line)
        if decl.important:
            self.add("css-important", line)
        if name == "display":
            value = tinycss2.serialize(decl.value).strip().lower()
            self.add(_DISPLAY_SLUGS.get(value), line)
        for token in _tokens(decl.value):
            self.add(_value_slug(token), line)

    def selector(self, prelude: str, line: int) -> None:
        for slug in selector_features(prelude):
            self.add(slug, line)


def _tokens(values: Iterable[ast.Node]) -> Iterator[ast.Node]:
    """Every component value, functions' arguments included."""
    for token in values:
        yield token
        if isinstance(token, (ast.FunctionBlock, ast.ParenthesesBlock, ast.SquareBracketsBlock)):
            yield from _tokens(token.arguments if isinstance(token, ast.FunctionBlock)
                               else token.content)


def _value_slug(token: ast.Node) -> str | None:
    if isinstance(token, ast.FunctionBlock):
        return _FUNCTION_SLUGS.get(token.lower_name)
    if isinstance(token, ast.DimensionToken) and token.lower_unit in _UNITS:
        return f"css-unit-{token.lower_unit}"
    if isinstance(token, ast.PercentageToken):
        return "css-unit-percent"
    if isinstance(token, ast.IdentToken):
        return _KEYWORD_SLUGS.get(token.lower_value)
    return None


def selector_features(prelude: str) -> set[str]:
    """The selector slugs of one rule's selector list (".a > p, h1:hover")."""
    found: set[str] = set()
    selectors = [s.strip() for s in _NESTED.sub(_blank, prelude).split(",") if s.strip()]
    originals = [s.strip() for s in prelude.split(",") if s.strip()]
    if len(selectors) > 1:
        found.add("css-selector-grouping")
    for plain in selectors:
        found |= _combinators(plain)
    for original in originals:
        for colons, name in _PSEUDO.findall(original.lower()):
            if colons == "::" or name in _PSEUDO_ELEMENTS:
                if name in _PSEUDO_ELEMENTS:
                    found.add(f"css-pseudo-element-{name}")
            else:
                found.add(f"css-pseudo-class-{name}")
    return found


def _blank(match: re.Match[str]) -> str:
    # Brackets and parentheses kept, their content emptied: commas and ">" inside them
    # (":not(a, b)", "[title='a > b']") are not the selector's own.
    text = match.group(0)
    return text[0] + "x" * (len(text) - 2) + text[-1] if text[0] in "([" else '""'


def _combinators(selector: str) -> set[str]:
    found: set[str] = set()
    spaced = re.sub(r"\s*([>+~])\s*", r" \1 ", selector)
    parts = spaced.split()
    kinds = {">": "css-selector-child", "+": "css-selector-adjacent-sibling",
             "~": "css-selector-general-sibling"}
    previous_compound = False
    for part in parts:
        if part in kinds:
            found.add(kinds[part])
            previous_compound = False
            continue
        if previous_compound:
            found.add("css-selector-descendant")
        previous_compound = True
        found |= _compound(part)
    return found


def _compound(compound: str) -> set[str]:
    found: set[str] = set()
    head = re.sub(r"::?[a-zA-Z-]+(\(x*\))?", "", compound)  # pseudo-classes aside
    simple = 0
    if re.match(r"^[a-zA-Z]", head):
        found.add("css-selector-type")
    if head.startswith("*"):
        found.add("css-selector-universal")
    for marker, slug in ((".", "css-selector-class"), ("#", "css-selector-id"),
                         ("[", "css-selector-attribute")):
        count = head.count(marker)
        if count:
            found.add(slug)
            simple += count
    if simple > 1:
        found.add("css-selector-chaining")
    return found


def features(html: str, known: Iterable[str]) -> tuple[dict[str, list[int]], int]:
    """slug -> the lines where the feature appears (a line once per occurrence), for the
    slugs in `known` only; and the number of elements the weighting counts (as Mailpit
    does: all but the document's html, head and meta)."""
    known = frozenset(known)
    doc = scan(html)
    found: defaultdict[str, list[int]] = defaultdict(list)
    _html_features(doc, found)
    css = _Css(found, known)
    for text, line in doc.inline_styles:
        css.inline(text, line)
    for text, line in doc.sheets:
        css.sheet(text, line)
    nodes = sum(1 for el in doc.elements if el.tag not in ("html", "head", "meta"))
    return {slug: sorted(lines) for slug, lines in found.items() if lines and slug in known}, nodes

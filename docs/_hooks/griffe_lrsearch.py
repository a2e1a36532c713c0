"""A griffe extension: lrsearch's docstrings, written for readers of the source, as Markdown.

- Sphinx roles (``:class:`~lrsearch.Task```, ``:func:`search```) become code spans (``Task``,
  ``search``): the API reference is one page, with nothing to link them to.
- reST's ``Example::`` before an indented block becomes ``Example:`` (the block is Markdown code).
- ``Example:`` is an examples section (doctest lines rendered as code), as ``Examples:`` is.
- In ``Args:`` and ``Raises:``, a line at an entry's indentation that does not start an entry
  (``name: ...``, ``SomeError: ...``) continues the entry above, and several exceptions in one
  paragraph (``... cannot be reached. TrackingError: ...``) become one entry each.
- A line ending in ``:`` followed by an indented list (``Defaults:``, ``Methods:`` in a function)
  is a paragraph and a Markdown list, not a section griffe does not know.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
_ENTRY_SECTIONS = {"Args", "Arguments", "Parameters", "Keyword Args", "Other Parameters", "Raises"}
_SECTIONS = _ENTRY_SECTIONS | {"Returns", "Yields", "Examples", "Example", "Attributes", "Note", "Notes",
                               "Warning", "Warnings", "See Also", "References", "Receives"}
_HEADER = re.compile(r"^(\s*)([A-Z][\w ]*(?:\([^)]*\))?[\w ]*):\s*$")
_ARG = re.compile(r"^\*{0,2}\w+(?:, \*{0,2}\w+)*(?: \([^)]*\))?:(\s|$)")
_EXC = re.compile(r"^[A-Z]\w*(?:\.\w+)*:(\s|$)")
_INLINE_EXC = re.compile(r"(?<=[.;)]) ([A-Z]\w*(?:Error|Exception|Exit)|Interrupted): ")


def _role(match: re.Match) -> str:
    target = match.group(2)
    return f"``{target.split('.')[-1] if match.group(1) else target}``"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def markdown_docstring(text: str) -> str:
    text = _ROLE.sub(_role, text)
    text = re.sub(r"::$", ":", text, flags=re.M)  # reST's literal-block marker: the block is indented code
    lines, out = text.split("\n"), []
    section, sec_indent, item_indent = None, 0, None
    i = 0
    while i < len(lines):
        line = lines[i]
        header = _HEADER.match(line)
        nxt = next((ln for ln in lines[i + 1:] if ln.strip()), "")
        if header and _indent(nxt) > len(header.group(1)):
            name = header.group(2).strip()
            if name == "Example":
                line, name = f"{header.group(1)}Examples:", "Examples"
            if name in _SECTIONS:
                section, sec_indent, item_indent = name, len(header.group(1)), None
                out.append(line)
                i += 1
                continue
            if nxt.strip().startswith(("- ", "* ")):
                # a paragraph and a list: dedent the block to the header's level, a blank line first
                out += [line, ""]
                i += 1
                while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(header.group(1))):
                    out.append(lines[i][4:] if lines[i].startswith(" " * 4) else lines[i])
                    i += 1
                continue
        if section in _ENTRY_SECTIONS and line.strip():
            if _indent(line) <= sec_indent:
                section = None
            else:
                item_indent = _indent(line) if item_indent is None else item_indent
                if _indent(line) == item_indent:
                    out += _entries(line, item_indent, section)
                    i += 1
                    continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _entries(line: str, indent: int, section: str) -> list[str]:
    """One docstring line at an entry's indentation, as entries and continuation lines."""
    pad, body = " " * indent, line.strip()
    starts = _EXC if section == "Raises" else _ARG
    if not starts.match(body):
        body = " " * 4 + body  # continues the entry above
    if section == "Raises":
        parts = _INLINE_EXC.split(body)
        first, rest = parts[0], parts[1:]
        lines = [pad + first]
        for exc, desc in zip(rest[::2], rest[1::2], strict=True):
            lines.append(f"{pad}{exc}: {desc}")
        return lines
    return [pad + body]


class LrsearchDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)

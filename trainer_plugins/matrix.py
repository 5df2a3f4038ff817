"""The plugin x setup matrix, from the same declarations the host validates runs against (PluginSpec's
``supports``, ``works_with`` and ``evidence``), so the table users read cannot drift from what runs.

    trainer-plugins matrix                 # the table in the terminal
    trainer-plugins matrix --markdown      # the README's table (tests check the README holds it)
"""

from __future__ import annotations

from .spec import CELL_TITLES, CELLS, supported_cells

# Where the host proves that every cell a plugin does not support is refused before any model loads.
REFUSAL_TEST = "tests/test_matrix.py::test_every_unsupported_cell_is_refused_before_loading"
README_START, README_END = "<!-- matrix:start -->", "<!-- matrix:end -->"


def rows(host) -> list[dict]:
    """One row per installed plugin (built-in excluded), then one per declared pair: name -> cells, each
    cell {"works": bool, "evidence": test id or None}."""
    from .manager import BUILTIN

    out = []
    for name in sorted(n for n in host.specs if n != BUILTIN):
        spec = host.specs[name]
        works = supported_cells(spec)
        out.append({"name": name, "cells": {c: {"works": c in works, "evidence": spec.evidence.get(c)} for c in CELLS}})
    for a, b in host.pairs():
        cells = host.pair_cells(a, b)
        # each plugin's own limits apply to the pair too
        works = cells & supported_cells(host.specs[a]) & supported_cells(host.specs[b])
        def evidence(c):  # declared by either side, under the other's name
            return host.specs[a].evidence.get(f"{b}@{c}") or host.specs[b].evidence.get(f"{a}@{c}")

        out.append({"name": f"{a} + {b}", "cells": {c: {"works": c in works, "evidence": evidence(c)} for c in CELLS}})
    return out


def markdown(host, link_root: str = "") -> str:
    """The matrix as a Markdown table; each cell links to the test that proves it (``link_root`` prefixes
    the test paths, e.g. a repository URL)."""
    lines = ["| plugin | " + " | ".join(CELL_TITLES[c] for c in CELLS) + " |",
             "|---|" + "---|" * len(CELLS)]
    for row in rows(host):
        cells = []
        for c in CELLS:
            cell = row["cells"][c]
            if cell["works"]:
                cells.append(_link("tested", cell["evidence"], link_root) if cell["evidence"] else "works")
            else:
                cells.append(_link("refused", REFUSAL_TEST, link_root))
        lines.append(f"| `{row['name']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text(host) -> str:
    width = max([len(r["name"]) for r in rows(host)] + [6])
    head = "plugin".ljust(width) + "  " + "  ".join(CELL_TITLES[c].ljust(len(CELL_TITLES[c])) for c in CELLS)
    out = [head]
    for row in rows(host):
        marks = ["yes" if row["cells"][c]["works"] else "-" for c in CELLS]
        out.append(row["name"].ljust(width) + "  " + "  ".join(m.ljust(len(CELL_TITLES[c])) for m, c in zip(marks, CELLS)))
    out.append("yes: tested (2 CPU processes for DDP/ZeRO; see --markdown for the tests); -: refused before loading")
    return "\n".join(out)


def _link(label: str, test_id: str, root: str) -> str:
    """A link to the test's file (a pytest id cannot be an anchor), the test itself as the hover title."""
    path, _, name = test_id.partition("::")
    return f'[{label}]({root}{path} "{name}")'



def update_readme(path: str, host) -> bool:
    """Write the table between the README's matrix markers; True when the file changed."""
    with open(path, encoding="utf-8") as f:
        text_ = f.read()
    start, end = text_.index(README_START) + len(README_START), text_.index(README_END)
    new = text_[:start] + "\n" + markdown(host) + "\n" + text_[end:]
    if new != text_:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text_

"""Print (or write into the docs) each model's table of maps, generated from its ``MapSpec`` declarations.

    python scripts/map_table.py momkd              # print the Markdown table of one model
    python scripts/map_table.py --write            # refresh every table between the docs' markers
    python scripts/map_table.py --check            # exit 1 when a table in the docs is out of date

A table sits in a doc between ``<!-- map-table: <model> -->`` and ``<!-- /map-table -->``. Maps that repeat per
head, token, class or MFA module collapse into one row (``attention/head<j>``); MECDS is shown for one task named
``<task>``. The models are built with their default config (``in_dim=16``), so config-dependent counts (heads,
memory components) are the defaults.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from wsimil_core.api import MapSpec, create_model

ROOT = Path(__file__).resolve().parents[1]
#: the docs holding a table, and the model each table describes
DOCS = {
    "abmilx": "docs/methods/abmilx.md",
    "ahdmil": "docs/methods/ahdmil.md",
    "asmil": "docs/methods/asmil.md",
    "mecds": "docs/methods/mecds.md",
    "momkd": "docs/methods/momkd.md",
}
#: placeholder of a repeated index, by the word before it (``head3`` -> ``head<j>``)
PLACEHOLDERS = {"head": "j", "token": "k", "class": "c", "module": "l"}
KIND_TEXT = {
    "scalar": "scalar",
    "probability": "probability (0 to 1)",
    "signed": "signed (centred on 0)",
    "categorical": "categorical",
    "binary": "binary",
}
START = re.compile(r"<!-- map-table: (\w+) -->")
END = "<!-- /map-table -->"


def model_specs(model: str) -> list[MapSpec]:
    """The ``MapSpec`` list of ``model`` with its default config (MECDS: one task named ``<task>``)."""
    extra = {"tasks": {"<task>": 2}} if model == "mecds" else {}
    return create_model(model, in_dim=16, **extra).map_specs()


def _categories(spec: MapSpec) -> str:
    names = list(spec.categories)
    if len(names) > 6:
        names = [*names[:2], "...", *names[-2:]]
    return ", ".join(f"`{n}`" if n != "..." else n for n in names)


def collapse(specs: list[MapSpec]) -> list[tuple[str, MapSpec, str]]:
    """``[(shown name, spec, description)]``: maps numbered per head/token/class/module become one row whose name
    and description use the placeholder (``attention/head<j>``, "... in head <j> ...")."""
    rows: list[tuple[str, MapSpec, str]] = []
    seen: dict[str, int] = {}
    for spec in specs:
        m = re.fullmatch(r"(.*?)(head|token|class|module)(\d+)", spec.name)
        if m is None:
            rows.append((spec.name, spec, spec.description))
            continue
        word, idx = m.group(2), m.group(3)
        letter = PLACEHOLDERS[word]
        name = f"{m.group(1)}{word}<{letter}>"
        description = re.sub(rf"\b{word} {idx}\b", f"{word} <{letter}>", spec.description)
        if name in seen:
            continue
        seen[name] = len(rows)
        rows.append((name, spec, description))
    return rows


def table(model: str) -> str:
    """The Markdown table of ``model``'s maps: name, kind, categories or range, meaning."""
    lines = ["| map | kind | values | meaning |", "|---|---|---|---|"]
    for name, spec, description in collapse(model_specs(model)):
        if spec.is_categorical:
            values = _categories(spec)
        elif spec.range is not None:
            values = f"{spec.range[0]:g} to {spec.range[1]:g}"
        else:
            values = ""
        description = re.sub(r"(<\w+>)", r"`\1`", description)  # placeholders are code, not HTML tags
        lines.append(f"| `{name}` | {KIND_TEXT[spec.kind]} | {values} | {description} |")
    return "\n".join(lines)


def refresh(text: str) -> str:
    """``text`` with every marked table regenerated."""
    out, pos = [], 0
    for m in START.finditer(text):
        end = text.find(END, m.end())
        if end < 0:
            raise SystemExit(f"map-table: no {END} after {m.group(0)}")
        out.append(text[pos : m.end()] + "\n" + table(m.group(1)) + "\n")
        pos = end
    return "".join(out) + text[pos:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="models to print (default: every model with a doc table)")
    parser.add_argument("--write", action="store_true", help="refresh the tables in the docs")
    parser.add_argument("--check", action="store_true", help="exit 1 when a doc table is out of date")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        for model in args.models or list(DOCS):
            print(f"{model}:\n\n{table(model)}\n")
        return 0
    stale = []
    for doc in sorted(set(DOCS.values())):
        path = ROOT / doc
        text = path.read_text(encoding="utf-8")
        new = refresh(text)
        if new != text:
            stale.append(doc)
            if args.write:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run python scripts/map_table.py --write)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

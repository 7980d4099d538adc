"""Result files: Markdown tables and JSON + Markdown pairs, written atomically with machine info."""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from typing import Dict, List, Union

from .checkpoint import write_atomic
from .machine import machine_info


def write_text_atomic(path: str, data: Union[str, bytes]) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half-written; the file
    gets the mode the umask gives (not mkstemp's 0600)."""
    write_atomic(path, [data if isinstance(data, bytes) else data.encode("utf-8")])


def check_out_dir(path: str, flag: str = "--out") -> None:
    """Refuse, before any work, an output directory that is a file or cannot be written
    (a ValueError naming ``flag``); creates nothing."""
    target = os.path.abspath(path)
    probe = target
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "" if probe == target else f" ({probe} is a file)"
        raise ValueError(f"{flag} {path} is not a directory{where}; choose a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {path} is not writable ({probe}: {exc.strerror or exc})") from None


def markdown_table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: List[Dict[str, object]], columns: List[str], out_dir: str,
                  notes: str = "") -> Dict[str, str]:
    """Write ``name``.json and ``name``.md atomically; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    info = machine_info()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    payload = {"benchmark": name, "date": stamp, "machine": info, "rows": rows, "notes": notes}
    md = [f"# {name}", "", f"Measured {stamp}.", ""]
    md += [f"- {k}: {v}" for k, v in info.items()]
    md += ["", notes, "", markdown_table(rows, columns), ""]
    paths = {}
    for ext, text in (("json", json.dumps(payload, indent=2)), ("md", "\n".join(md))):
        paths[ext] = os.path.join(out_dir, f"{name}.{ext}")
        write_text_atomic(paths[ext], text)
    return paths

"""Build the built-in text calibration corpus, `templating/data/builtin-calibration.jsonl.xz`.

A developer tool (not collected by pytest). It reads only text that ships with CPython 3.11 under the
PSF licence (the interpreter running this script must be a CPython 3.11 with its Lib/ sources):

- `pydoc_data.topics`: the Python Language Reference topics that `help()` shows;
- the docstrings (200 characters or more, de-duplicated) of the standard-library modules, their
  classes and functions, except the test suite and a few GUI/legacy packages;
- IDLE's user guide (`idlelib/help.html`, tags stripped);

plus the short documents and conversations written for this project (`templating/embedded.py`).
Documents are cut at blank lines into chunks of at most `--max-chars` characters, so each chunk is
shorter than a 2048-token calibration sample and every token of the corpus can be used once. The
chunks are written in a fixed order as JSON lines `{"source": ..., "text": ...}`, xz-compressed, with
`builtin-calibration.json` beside them (counts, sha256, the Python version, and the token count
under the SmolLM2 tokenizer when `--tokenizer` names one) and the PSF licence as `LICENSE-PSF.txt`.

    python tests/bench/build_calibration_corpus.py --tokenizer ~/.cache/signround/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import html
import json
import lzma
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "templating" / "data"
SKIP = {"test", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "pydoc_data", "ensurepip",
        "distutils", "venv", "__pycache__"}
BLANK = re.compile(r"\n[ \t]*\n")


def chunks(text: str, max_chars: int) -> list[str]:
    """`text` cut at blank lines into pieces of at most `max_chars` (a longer paragraph at lines)."""
    out: list[str] = []
    cur = ""
    for para in BLANK.split(text.strip()):
        para = para.strip("\n")
        pieces = [para] if len(para) <= max_chars else _lines(para, max_chars)
        for piece in pieces:
            if cur and len(cur) + 2 + len(piece) > max_chars:
                out.append(cur)
                cur = ""
            cur = f"{cur}\n\n{piece}" if cur else piece
    if cur.strip():
        out.append(cur)
    return [c for c in out if c.strip()]


def _lines(para: str, max_chars: int) -> list[str]:
    out, cur = [], ""
    for line in para.split("\n"):
        if cur and len(cur) + 1 + len(line) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n{line}" if cur else line[:max_chars]
    if cur:
        out.append(cur)
    return out


def topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics as table

    return [(f"pydoc_data.topics:{name}", table[name]) for name in sorted(table)]


def docstrings(lib: Path, min_chars: int) -> list[tuple[str, str]]:
    seen: set[str] = set()
    out = []
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if rel.parts[0] in SKIP or "tests" in rel.parts or rel.name.startswith("_sysconfigdata"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars and doc not in seen:
                    seen.add(doc)
                    name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                    out.append((f"stdlib docstring:{name}", doc))
    return out


def idle_help(lib: Path) -> list[tuple[str, str]]:
    raw = (lib / "idlelib" / "help.html").read_text(encoding="utf-8")
    body = raw.split('<div class="body" role="main">', 1)[-1].split('<div class="sphinxsidebar"', 1)[0]
    body = re.sub(r"<(script|style)\b.*?</\1>", "", body, flags=re.S)
    body = re.sub(r"</(p|h[1-6]|li|dt|dd|pre|div|section)>", "\n\n", body)
    text = html.unescape(re.sub(r"<[^>]+>", "", body))
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text).replace("¶", "")
    return [("idlelib/help.html", text)]


def ours() -> list[tuple[str, str]]:
    sys.path.insert(0, str(ROOT.parent))
    from signround.templating import embedded

    docs = [(f"signround embedded text {i}", t) for i, t in enumerate(embedded._TEXTS)]
    docs += [(f"signround embedded conversation {i}", f"{q}\n\n{a}") for i, (q, a) in enumerate(embedded._TEXT_CONVERSATIONS)]
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-chars", type=int, default=3000)
    ap.add_argument("--min-docstring", type=int, default=200)
    ap.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer directory to count tokens with")
    args = ap.parse_args()
    if sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 11):
        sys.exit("build the corpus with CPython 3.11 (its Lib/ sources are the text)")
    lib = Path(os.__file__).parent
    docs = topics() + docstrings(lib, args.min_docstring) + idle_help(lib) + ours()
    seen: set[str] = set()
    records = []
    for src, text in docs:
        for c in chunks(text, args.max_chars):
            if c not in seen:  # a paragraph repeated in two docstrings is kept once
                seen.add(c)
                records.append({"source": src, "text": c})
    payload = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    OUT.mkdir(exist_ok=True)
    (OUT / "builtin-calibration.jsonl.xz").write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    (OUT / "LICENSE-PSF.txt").write_text((lib / "LICENSE.txt").read_text(encoding="utf-8"), encoding="utf-8")
    manifest = {
        "file": "builtin-calibration.jsonl.xz",
        "sha256": hashlib.sha256(payload).hexdigest(),
        "documents": len(records),
        "characters": sum(len(r["text"]) for r in records),
        "python": sys.version.split()[0],
        "sources": {"pydoc_data.topics": sum(r["source"].startswith("pydoc_data") for r in records),
                    "stdlib docstrings": sum(r["source"].startswith("stdlib") for r in records),
                    "idlelib/help.html": sum(r["source"].startswith("idlelib") for r in records),
                    "signround": sum(r["source"].startswith("signround") for r in records)},
        "licence": "Python Software Foundation License Version 2 (LICENSE-PSF.txt) for the CPython text; "
                   "Apache-2.0 (the package's) for the signround documents",
    }
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        counts = [len(ids) for ids in tok([r["text"] for r in records], add_special_tokens=False)["input_ids"]]
        manifest["tokens"] = {"tokenizer": args.tokenizer.name, "total": sum(counts), "longest_document": max(counts)}
    (OUT / "builtin-calibration.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()

"""The bundle's checksum manifest: every file with its SHA-256, size and executable bit;
the bundle id is the hash of that list, so identical content gives an identical id.

Standard library only (runs on the target to verify what arrived).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vpp_edge.errors import VPPError
from vpp_edge.runtime.manifest import sha256_file
from vpp_edge.files import read_json

BUNDLE_FILE = "BUNDLE.json"
SUMS_FILE = "SHA256SUMS"  # the same hashes for `sha256sum -c` by hand
FORMAT_NAME = "vpp-edge-bundle"
FORMAT_VERSION = 1
ID_LENGTH = 16  # hex digits of the id used in folder names (64 bits: collisions are not a concern)


class BundleError(VPPError):
    """A bundle is incomplete, altered, or not a bundle."""


def bundle_id(files: dict[str, dict]) -> str:
    """Content id of a file table {relative path: {"sha256", "size", "executable"}}."""
    h = hashlib.sha256()
    for path in sorted(files):
        entry = files[path]
        h.update(f"{entry['sha256']} {'x' if entry['executable'] else '-'} {path}\n".encode())
    return h.hexdigest()[:ID_LENGTH]


def manifest_text(files: dict[str, dict]) -> str:
    """BUNDLE.json content: deterministic (sorted keys, no timestamps)."""
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "id": bundle_id(files),
           "files": {p: files[p] for p in sorted(files)}}
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def sums_text(files: dict[str, dict]) -> str:
    return "".join(f"{files[p]['sha256']}  {p}\n" for p in sorted(files))


def _walk(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in (BUNDLE_FILE, SUMS_FILE):
                out.append(rel)
    return sorted(out)


def read_bundle_manifest(root: str | Path) -> dict:
    path = Path(root) / BUNDLE_FILE
    doc = read_json(path, BundleError, "not a vpp-edge bundle")
    if doc.get("format") != FORMAT_NAME or doc.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: not a {FORMAT_NAME} v{FORMAT_VERSION} manifest")
    return doc


def verify_tree(root: str | Path, ignore: tuple[str, ...] = ()) -> tuple[int, int]:
    """Check every file of the bundle at ``root`` against BUNDLE.json: none missing, none
    changed, none extra (paths under ``ignore`` prefixes excepted). Returns (files, bytes)."""
    root = Path(root)
    doc = read_bundle_manifest(root)
    files = doc["files"]
    if bundle_id(files) != doc["id"]:
        raise BundleError(f"{root / BUNDLE_FILE}: id {doc['id']} does not match its own file table")
    problems = []
    for rel, entry in files.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"missing: {rel}")
        elif path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"changed: {rel} (sha256 differs from {BUNDLE_FILE})")
        elif os.access(path, os.X_OK) != entry["executable"]:
            problems.append(f"mode: {rel} (executable bit differs)")
    extra = [p for p in _walk(root) if p not in files and not p.startswith(ignore)
             and "__pycache__/" not in p]  # bytecode Python writes on the target
    problems += [f"unexpected: {p}" for p in extra]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise BundleError(f"bundle {root} failed verification ({len(problems)} problems): {shown}")
    return len(files), sum(e["size"] for e in files.values())

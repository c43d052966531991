"""`python -m weights status | fetch | verify | link | path`: the user's handle on weight files."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import IO, Sequence

from .choice import BASE_LINK, DEMO_FILES, auto_choice, demo_dir, demo_missing, link_base
from .fetch import FetchError, fetch_artifact
from .hf_link import is_hf_folder, link_hf_llama1_7b
from .packaged import PACKAGED
from .link import LinkError, describe, link_artifact
from .manifest import Artifact, Manifest, ManifestError, load_manifest
from .store import (
    WEIGHTS_ENV,
    FileCheck,
    MissingWeightError,
    State,
    check_artifact,
    display_path,
    fix_command,
    overall_state,
    require,
    weights_dir,
)


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _size_cell(checks: list[FileCheck]) -> str:
    """Bytes on disk; for missing files the expected size in parentheses."""
    if all(c.size is not None for c in checks):
        return human_size(sum(c.size for c in checks))  # type: ignore[misc]
    expected = [c.file.size for c in checks]
    return f"({human_size(sum(expected))})" if None not in expected else "(?)"


def _table(rows: list[list[str]], out: IO[str]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _short(path: str) -> str:
    """Shorten the 64-digit sha256 prefixes of release file names so the table fits a terminal."""
    return re.sub(r"[0-9a-f]{64}", lambda m: m[0][:8] + "...", path)


def _location(art: Artifact, root: Path) -> Path:
    return root / art.files[0].path if len(art.files) == 1 else root / art.folder


def _select(manifest: Manifest, names: Sequence[str]) -> list[Artifact]:
    return [manifest.get(n) for n in names] if names else list(manifest)


def cmd_status(args: argparse.Namespace, manifest: Manifest, root: Path, out: IO[str]) -> int:
    rows = [["NAME", "COMPONENT", "STATE", "SIZE", "PATH"]]
    problems: list[str] = []
    fixes: list[str] = []
    for art in _select(manifest, args.names):
        checks = check_artifact(art, root, hash=args.hash)
        state = overall_state(checks)
        rows.append([art.name, art.component, state.value, _size_cell(checks), _short(display_path(_location(art, root)))])
        for c in checks:
            if c.detail:
                problems.append(f"  {display_path(c.path)}: {c.state.value}, {c.detail}")
        if state in (State.MISSING, State.CORRUPT):
            fixes.append(fix_command(art, root) + (" --force" if state is State.CORRUPT else ""))
    if not args.names:  # the project's own demo model is not in the manifest: it ships in the repository
        missing = demo_missing(root)
        files = [demo_dir(root) / f for f in DEMO_FILES if f not in missing]
        rows.append(["demo", "demo model (toy world)", "incomplete" if missing else "present",
                     human_size(sum(f.stat().st_size for f in files)), display_path(demo_dir(root))])
        if missing:
            problems.append(f"  {display_path(demo_dir(root))}: missing {', '.join(missing)} "
                            "(see weights/demo/README.md for the command that trains it)")
    if not args.names:  # weights that packages from the registry carry (installed by the set-up)
        for weight in PACKAGED:
            path = weight.path()
            rows.append([weight.name, weight.component, "present" if path else "missing",
                         human_size(path.stat().st_size) if path else "(?)",
                         f"package {weight.package}" if path else "-"])
            if path is None:
                fixes.append(weight.install)
    choice = auto_choice(root)
    print(f"the app would load: {choice.model} ({choice.reason})", file=out)
    print(f"weights folder: {display_path(root)}  (--dir or ${WEIGHTS_ENV} to change)", file=out)
    _table(rows, out)
    if problems:
        print("\nproblems:", *problems, sep="\n", file=out)
    if fixes:
        print("\nto fix:", *(f"  {f}" for f in fixes), sep="\n", file=out)
    if not args.hash:
        print("\n(sizes only; `python -m weights verify` checks the sha256/md5 sums)", file=out)
    return 0


def cmd_verify(args: argparse.Namespace, manifest: Manifest, root: Path, out: IO[str]) -> int:
    status, missing = 0, 0
    for art in _select(manifest, args.names):
        for c in check_artifact(art, root, hash=True):
            shown = display_path(c.path)
            if c.state is State.MISSING:
                missing += 1
                if args.names:  # asked for by name: its absence is an error
                    print(f"missing  {shown}" + (f" ({c.detail})" if c.detail else "")
                          + f"  -> {fix_command(art, root)}", file=out)
                    status = 1
            elif c.state is State.CORRUPT:
                print(f"CORRUPT  {shown}: {c.detail}  -> {fix_command(art, root)} --force", file=out)
                status = 1
            elif c.checked in ("sha256", "md5"):
                print(f"ok       {shown} ({c.checked} matches)", file=out)
            else:
                print(f"present  {shown} (no checksum in the manifest; sha256 {c.digests['sha256']})", file=out)
    if missing and not args.names:
        print(f"{missing} file(s) not present (see `python -m weights status`)", file=out)
    return status


def cmd_fetch(args: argparse.Namespace, manifest: Manifest, root: Path, out: IO[str]) -> int:
    if not args.names and not args.all:
        print("name one or more artifacts, or pass --all (see `python -m weights status`)", file=sys.stderr)
        return 2
    arts = list(manifest) if args.all else [manifest.get(n) for n in args.names]
    status = 0
    for art in arts:
        if args.all and not art.fetchable:
            print(f"skip     {art.name}: no public URL; {fix_command(art, root)}", file=out)
            continue
        try:
            for r in fetch_artifact(art, root, force=args.force, retries=args.retries, timeout=args.timeout):
                how = f"{r.checked} verified" if r.checked else f"no checksum in the manifest; sha256 {r.sha256}"
                print(f"{r.action:<16} {display_path(r.path)} ({how})", file=out)
        except FetchError as err:
            print(f"error    {art.name}: {err}", file=sys.stderr)
            status = 1
    return status


def cmd_link(args: argparse.Namespace, manifest: Manifest, root: Path, out: IO[str]) -> int:
    if args.name == BASE_LINK:  # a LLaMA-family base of the user's own, loaded when llama-7b is absent
        try:
            dest = link_base(args.path, root)
        except (ValueError, OSError) as err:
            print(f"error    base: {err}", file=sys.stderr)
            return 1
        print(f"{display_path(dest)} -> {os.readlink(dest)}", file=out)
        print("linked base; the app loads it when llama-7b is absent (nothing was copied)", file=out)
        return 0
    art = manifest.get(args.name)
    if art.name == "llama-7b" and is_hf_folder(Path(args.path).expanduser()):  # a Hugging Face copy
        try:
            dest = link_hf_llama1_7b(args.path, root, force=args.force)
        except LinkError as err:
            print(f"error    {art.name}: {err}", file=sys.stderr)
            return 1
        print(f"{display_path(dest)} -> {os.readlink(dest)}", file=out)
        print(f"linked {art.name} as a Hugging Face folder (its config and sizes are LLaMA-1 7B's; Hugging Face "
              "copies have no published checksums); no files were copied", file=out)
        return 0
    try:
        results = link_artifact(art, args.path, root, force=args.force, verify=not args.no_verify)
    except LinkError as err:
        print(f"error    {art.name}: {err}", file=sys.stderr)
        return 1
    print(describe(results), file=out)
    verified = "checksums not verified (--no-verify)" if args.no_verify else "verified"
    print(f"linked {art.name} ({verified}); no files were copied", file=out)
    return 0


def cmd_path(args: argparse.Namespace, manifest: Manifest, root: Path, out: IO[str]) -> int:
    try:
        print(require(args.name, root, manifest), file=out)
    except MissingWeightError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=argparse.SUPPRESS, metavar="DIR",
                        help=f"weights folder (default: ${WEIGHTS_ENV}, else <repo>/weights)")
    common.add_argument("--manifest", default=argparse.SUPPRESS, metavar="FILE",
                        help="manifest file (default: $MM_WEIGHTS_MANIFEST, else weights/manifest.toml)")
    parser = argparse.ArgumentParser(prog="python -m weights", parents=[common],
                                     description="List, fetch, verify and link the product's weight files.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("status", parents=[common], help="table of present, missing and corrupt files")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--hash", action="store_true", help="also compare sha256/md5 (slow for big files)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("fetch", parents=[common], help="download, resume and verify artifacts")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--all", action="store_true", help="every artifact that has a public URL")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.add_argument("--retries", type=int, default=3, help="resume attempts after a cut transfer")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("verify", parents=[common], help="hash present files against the manifest")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("link", parents=[common], help="symlink files you already have (no copy)")
    p.add_argument("name", metavar="NAME", help="a manifest name, or 'base' for a LLaMA-family base of your own "
                                                 "(a Hugging Face or Meta folder, or a .gguf file)")
    p.add_argument("path", metavar="PATH", help="the file, or the folder holding the files")
    p.add_argument("--force", action="store_true", help="replace a real file already in place")
    p.add_argument("--no-verify", action="store_true", help="skip checksums (sizes are still checked)")
    p.set_defaults(func=cmd_link)

    p = sub.add_parser("path", parents=[common], help="print where an artifact is (for scripts)")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_path)
    return parser


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    try:
        manifest = load_manifest(getattr(args, "manifest", None))
        root = weights_dir(getattr(args, "dir", None))
        return args.func(args, manifest, root, out)
    except (KeyError, ManifestError, OSError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

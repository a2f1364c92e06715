"""Paths that differ between machines: a study mounted elsewhere, FSL installed elsewhere.

`.commands` holds absolute paths of the machine that wrote it (`$FSLDIR/bin/fsl_reg`, the FA
directory). A path map rewrites a prefix on submit (`submit --path-map`) or on one worker
(`worker --path-map`); a worker also finds FSL tools under its own $FSLDIR.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tbss_queue.errors import ConfigError


@dataclass(frozen=True)
class PathMap:
    """Prefix rewrites, longest prefix first; applied to whole path components only."""

    rules: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, specs: Sequence[str], option: str = "--path-map") -> PathMap:
        rules = []
        for spec in specs:
            src, sep, dst = spec.partition("=")
            if not sep or not src.startswith("/") or not dst.startswith("/"):
                raise ConfigError(f"{option} {spec!r}: expected /FROM/PREFIX=/TO/PREFIX")
            rules.append((src.rstrip("/") or "/", dst.rstrip("/") or "/"))
        return cls(tuple(sorted(rules, key=lambda r: -len(r[0]))))

    def apply(self, word: str) -> str:
        for src, dst in self.rules:
            if word == src or word.startswith(src + "/"):
                return dst + word[len(src) :]
        return word

    def argv(self, argv: Sequence[str]) -> list[str]:
        return [self.apply(w) for w in argv]

    def __bool__(self) -> bool:
        return bool(self.rules)


def local_fsl_tool(program: str, env: Mapping[str, str]) -> str:
    """`/other/fsl/bin/fsl_reg` -> `$FSLDIR/bin/fsl_reg` when the written path does not exist
    here but this machine's FSL has the tool."""
    fsldir = env.get("FSLDIR")
    if not fsldir or os.path.exists(program):
        return program
    head, tool = os.path.split(program)
    if os.path.basename(head) != "bin":
        return program
    mine = os.path.join(fsldir, "bin", tool)
    return mine if os.access(mine, os.X_OK) else program


def fsl_env(env: Mapping[str, str]) -> dict[str, str]:
    """FSL's variables for a command: $FSLDIR/bin first on PATH, NIFTI_GZ output by default."""
    out = dict(env)
    out.setdefault("FSLOUTPUTTYPE", "NIFTI_GZ")
    fsldir = out.get("FSLDIR")
    if fsldir:
        out["PATH"] = os.pathsep.join([os.path.join(fsldir, "bin"), out.get("PATH", "")])
    return out


def within(path: str, roots: Sequence[str]) -> bool:
    """Whether `path` (symlinks followed) lies under one of `roots` (already real paths)."""
    real = os.path.realpath(path)
    return any(under(real, root) for root in roots)


def under(path: str, root: str) -> bool:
    """Component-wise containment of normalized paths: /data holds /data/x, not /database."""
    root = os.path.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")

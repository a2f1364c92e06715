"""What a worker agrees to run. The worker is the trust boundary: whoever can write to Redis
can put any command in the queue, so each command is checked here before anything runs.

- Only allowed executables run, judged by the RESOLVED path (`../../bin/sh` or a symlink named
  fsl_reg pointing at bash do not slip through). By default: FSL's registration tools, trusted
  by where they live (under the worker's $FSLDIR), never by their name: a copy of bash called
  fsl_reg in the study tree is not FSL. Without $FSLDIR, FSL tools need --allow PATH.
- Interpreters (sh, bash, python, perl, env...) are refused unless explicitly allowed: with
  them any code could come in as an argument.
- With --root, the working directory must lie under one of the roots.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

FSL_TOOLS = (
    "fsl_reg",
    "flirt",
    "fnirt",
    "applywarp",
    "invwarp",
    "convertwarp",
    "fslmaths",
    "fnirtfileutils",
    "tbss_*",
)
"""Executables TBSS's registration step runs (fsl_reg calls the others)."""

INTERPRETERS = (
    "sh",
    "bash",
    "dash",
    "zsh",
    "ksh",
    "mksh",
    "csh",
    "tcsh",
    "fish",
    "busybox",
    "python",
    "python[0-9]*",
    "pypy*",
    "perl*",
    "ruby*",
    "node",
    "nodejs",
    "php*",
    "lua*",
    "tclsh*",
    "wish*",
    "Rscript",
    "R",
    "julia",
    "env",
    "xargs",
    "nohup",
    "nice",
    "timeout",
    "setsid",
    "sudo",
    "su",
    "doas",
    "ssh",
    "awk",
    "gawk",
    "mawk",
    "sed",
    "find",
    "make",
)
"""Programs that run code or other programs given as arguments: refused unless allowed by
name or path explicitly (a pattern such as `*` does not count)."""


def within(path: str, roots: Sequence[str]) -> bool:
    """Whether `path` (symlinks followed) lies under one of `roots` (already real paths)."""
    real = os.path.realpath(path)
    return any(under(real, root) for root in roots)


@dataclass(frozen=True)
class Policy:
    allow: tuple[str, ...] = ()
    allow_any: bool = False
    roots: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        allow: Sequence[str] = (),
        allow_file: str | None = None,
        allow_any: bool = False,
        roots: Sequence[str] = (),
    ) -> Policy:
        extra = list(allow)
        if allow_file:
            try:
                lines = Path(allow_file).read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"--allow-file {allow_file}: {exc.strerror}") from None
            extra += [ln.split("#", 1)[0].strip() for ln in lines]
        for root in roots:
            if not os.path.isdir(root):
                raise ConfigError(f"--root {root}: not a directory")
        return cls(
            tuple(e for e in extra if e), allow_any, tuple(os.path.realpath(r) for r in roots)
        )

    def check(self, argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> str | None:
        """None if the command may run here, else why not (one line)."""
        return self.judge(argv, cwd, env)[0]

    def judge(
        self, argv: Sequence[str], cwd: str, env: Mapping[str, str]
    ) -> tuple[str | None, str | None]:
        """(why not, or None; the real file judged, or None when there is none): the worker
        executes exactly that file, never the name or link it was found by."""
        resolved = resolve(argv[0], cwd, env)
        return self._refusal(argv, cwd, env, resolved), resolved

    def _refusal(
        self, argv: Sequence[str], cwd: str, env: Mapping[str, str], resolved: str | None
    ) -> str | None:
        if self.roots:
            real_cwd = os.path.realpath(cwd)
            if not any(under(real_cwd, root) for root in self.roots):
                return (
                    f"working directory {cwd} is outside this worker's --root "
                    f"({', '.join(self.roots)})"
                )
        if self.allow_any:
            return None
        if resolved is None:
            return None  # not found: the runner reports it as such
        name = os.path.basename(resolved)
        if self._explicit(resolved, env):
            return None
        if any(fnmatch.fnmatchcase(name, p) for p in INTERPRETERS):
            return (
                f"{argv[0]} resolves to the interpreter {resolved}: refused unless allowed "
                f"explicitly (worker --allow {name})"
            )
        if any(fnmatch.fnmatchcase(name, p) for p in self.allow if "/" not in p):
            return None
        fsldir = env.get("FSLDIR")
        if any(fnmatch.fnmatchcase(name, p) for p in FSL_TOOLS):
            if not fsldir:
                return (
                    f"{argv[0]}: FSL tools run only from this worker's $FSLDIR, and it has none: "
                    "start the worker with FSLDIR set (source $FSLDIR/etc/fslconf/fsl.sh), or "
                    f"--allow {resolved}"
                )
            if under(resolved, os.path.realpath(fsldir)):
                return None
            return f"{resolved} is not under this worker's FSLDIR ({fsldir})"
        return (
            f"{argv[0]} ({resolved}) is not an allowed executable here "
            "(worker --allow NAME_OR_PATH, or --allow-any)"
        )

    def _explicit(self, resolved: str, env: Mapping[str, str]) -> bool:
        """Allowed by path, or by a plain name that resolves here to this very file."""
        for entry in self.allow:
            if _has_glob(entry):
                continue
            if "/" in entry and os.path.realpath(entry) == resolved:
                return True
            if "/" not in entry and resolve(entry, "/", env) == resolved:
                return True
        return False


def locate(program: str, cwd: str, env: Mapping[str, str]) -> str | None:
    """The absolute path a command's program is found at (relative to cwd, or on PATH).

    The worker executes exactly this path, the one the policy judged: Popen does not search
    PATH again, so check and use can't see two different files."""
    if "/" in program:
        path = os.path.normpath(os.path.join(cwd, program))
    else:
        found = shutil.which(program, path=env.get("PATH"))
        if found is None:
            return None
        path = os.path.abspath(found)
    return path if os.path.isfile(path) else None


def resolve(program: str, cwd: str, env: Mapping[str, str]) -> str | None:
    """The real file a command would execute: `locate`, with symlinks followed."""
    path = locate(program, cwd, env)
    if path is None:
        return None
    real = os.path.realpath(path)
    return real if os.path.isfile(real) else None


def under(path: str, root: str) -> bool:
    """Component-wise containment of normalized paths: /data holds /data/x, not /database."""
    root = os.path.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")

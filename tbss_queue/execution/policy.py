"""What a worker agrees to run. The worker is the trust boundary: whoever can write to Redis
can put any command in the queue, so each command is checked here before anything runs.

- Only allowed executables run, judged by the RESOLVED path (`../../bin/sh` or a symlink named
  fsl_reg pointing at bash do not slip through). By default: FSL's registration tools, trusted
  by where they live (under the worker's $FSLDIR), never by their name: a copy of bash called
  fsl_reg in the study tree is not FSL. Without $FSLDIR, FSL tools need --allow PATH.
- `--allow` names files: a path, or a bare name looked up ONCE, when the worker starts (its
  banner prints the file it trusts). A file with the same name elsewhere is not that file, and
  a pattern (`*`) is no allowlist: a worker refuses one (`--allow-any` says what it means).
- Interpreters (sh, bash, python, perl, env...) are refused unless explicitly allowed: with
  them any code could come in as an argument. This list only explains refusals; the boundary
  is the allowlist of files (no list of names can cover `stdbuf`, `ionice`, `taskset`...).
- With --root, the working directory must lie under one of the roots.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tbss_queue.errors import ConfigError
from tbss_queue.paths import fsl_env, under

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


@dataclass(frozen=True)
class Policy:
    allow: tuple[str, ...] = ()
    allow_any: bool = False
    roots: tuple[str, ...] = ()
    trusted: tuple[str, ...] = ()
    """The real files the `allow` entries name, resolved once when the policy is built (a bare
    name on this worker's PATH, at its start): a command runs one of these files, never a
    file that merely has the same name."""

    @classmethod
    def build(
        cls,
        allow: Sequence[str] = (),
        allow_file: str | None = None,
        allow_any: bool = False,
        roots: Sequence[str] = (),
        *,
        refuse_patterns: bool = False,
    ) -> Policy:
        """ConfigError names a missing root or allowed file; with `refuse_patterns` (a
        worker's own policy) also a pattern such as `*`, which can't name a file to trust."""
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
        entries = tuple(e for e in extra if e)
        if refuse_patterns:
            for entry in entries:
                if _has_glob(entry):
                    raise ConfigError(
                        f"--allow {entry!r}: a pattern is not an allowlist (it lets interpreters "
                        "in under any name); name each program by its path, or use --allow-any "
                        "to run anything that reaches the queue"
                    )
        trusted = tuple(_trust(e) for e in entries if not _has_glob(e))
        return cls(entries, allow_any, tuple(os.path.realpath(r) for r in roots), trusted)

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
                f"explicitly (worker --allow {resolved})"
            )
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
            f"(worker --allow {resolved}, or --allow-any)"
        )

    def _explicit(self, resolved: str, env: Mapping[str, str]) -> bool:
        """One of the files the allow entries named when the worker started."""
        return resolved in self.trusted


def _trust(entry: str) -> str:
    """The real file an --allow entry names: a path, or a bare name looked up once on this
    worker's PATH ($FSLDIR/bin first, as commands see it)."""
    if "/" in entry:
        real = os.path.realpath(entry)
        if not os.path.isfile(real):
            raise ConfigError(f"--allow {entry}: no such file")
        return real
    found = shutil.which(entry, path=fsl_env(os.environ).get("PATH"))
    if found is None:
        raise ConfigError(f"--allow {entry}: not found on this worker's PATH")
    return os.path.realpath(found)


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


def _has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")

"""FSL's image-name tools as TBSS's scripts use them: `imglob` on a shell glob, `imcp`, `imtest`.

`tbss_2_reg` lists subjects with `imglob *_FA.*`: the shell expands the glob first (so dotfiles,
such as macOS's `._sub01_FA.nii.gz`, never appear), then fslpy's imglob strips every image
extension it knows (`.nii.bz2` and `.nii.zst` included) and drops what is no image. It copies
a target with `imcp`, which writes the type FSLOUTPUTTYPE names (`target.nii.gz` by default),
converting the image when the source is of another type.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path
from typing import Any

IMGLOB_SUFFIXES = (
    ".nii.gz",
    ".nii",
    ".nii.zst",
    ".nii.bz2",
    ".img",
    ".hdr",
    ".img.gz",
    ".hdr.gz",
    ".img.zst",
    ".hdr.zst",
    ".img.bz2",
    ".hdr.bz2",
)
"""The extensions fslpy 3.29's imglob recognises, in its order (the first that matches wins)."""

OUTPUT_TYPES = {
    "NIFTI_GZ": ".nii.gz",
    "NIFTI": ".nii",
    "NIFTI_PAIR": ".img",
    "NIFTI_PAIR_GZ": ".img.gz",
}
"""FSLOUTPUTTYPE -> the extension FSL's tools (and imcp) write; NIFTI_GZ when unset."""

_PAIRS = {".img": ".hdr", ".img.gz": ".hdr.gz"}


def split_image(name: str) -> tuple[str, str]:
    """(prefix, extension) as fslpy splits a name; extension '' when it is no image name."""
    for suffix in IMGLOB_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def imglob(directory: str | os.PathLike[str], *globs: str) -> list[str]:
    """What `imglob GLOB...` prints when run in `directory` from a shell (GLOB: `*_FA.*` unless
    given): image prefixes, sorted.

    The shell's glob skips names that start with a dot; a matching name is an image when,
    after its image extension is removed, some prefix+extension file exists."""
    names = [n for n in os.listdir(directory) if not n.startswith(".")]
    present = set(names)
    found = set()
    for name in names:
        if not any(fnmatch.fnmatchcase(name, g) for g in globs or ("*_FA.*",)):
            continue
        prefix, suffix = split_image(name)
        if suffix or any(prefix + s in present for s in IMGLOB_SUFFIXES):
            found.add(prefix)
    return sorted(found)


def image_exists(prefix: str | os.PathLike[str]) -> bool:
    """`imtest`: an image with this prefix exists, whatever its type."""
    return any(os.path.isfile(f"{prefix}{s}") for s in IMGLOB_SUFFIXES)


def find_image(source: str) -> str | None:
    """The file `source` names: itself if it is one, else the first prefix+extension found."""
    if split_image(source)[1] and os.path.isfile(source):
        return source
    return next((source + s for s in IMGLOB_SUFFIXES if os.path.isfile(source + s)), None)


def imcp(source: str, dest_prefix: Path, output_type: str | None = None) -> Path:
    """Copy an image as fslpy's `imcp SRC DEST` does: to DEST plus FSLOUTPUTTYPE's extension,
    converting with nibabel when the source is of another type. Older copies of DEST in other
    types are removed, so `imtest DEST` finds one image. Returns the file written."""
    ext = OUTPUT_TYPES.get(output_type or os.environ.get("FSLOUTPUTTYPE") or "NIFTI_GZ", ".nii.gz")
    found = find_image(source)
    if found is None:
        raise FileNotFoundError(source)
    dest = Path(f"{dest_prefix}{ext}")
    for old in IMGLOB_SUFFIXES:
        Path(f"{dest_prefix}{old}").unlink(missing_ok=True)
    src_ext = split_image(found)[1]
    if src_ext == ext:
        shutil.copyfile(found, dest)
        if ext in _PAIRS:
            shutil.copyfile(found[: -len(ext)] + _PAIRS[ext], f"{dest_prefix}{_PAIRS[ext]}")
        return dest
    import nibabel as nib  # only for a conversion, as imcp does

    image: Any = nib.load(found)
    # as imcp: the stored values and scaling kept, not rescaled by nibabel on save
    slope, inter = image.dataobj.slope, image.dataobj.inter
    data = image.dataobj.get_unscaled()
    kind = nib.Nifti1Pair if ext in _PAIRS else nib.Nifti1Image
    copy = kind(data, None, header=image.header)
    copy.header.set_slope_inter(slope, inter)
    nib.save(copy, str(dest))
    return dest

"""Files edgeseg writes and reads on a user's disk: atomic writes, recognisable temporaries,
bounded reads and containment inside a folder.

- Every temporary file or folder edgeseg makes beside its output is named
  `.edgeseg-tmp-<pid>-<host>-...`, so a later write can tell whose it is: `clean_stale_temps`
  removes those whose process is gone (after a `kill -9` or a power cut) and never touches a
  live writer's, nor another machine's on a shared folder.
- `atomic_path` builds a file or folder under such a name and moves it into place: a half-written
  artifact, manifest or video never appears under its final name.
- `read_bounded` reads a small file (a manifest) without following it into a FIFO, a device or a
  multi-gigabyte file; `contained` resolves a relative path and refuses anything (`..`, an
  absolute path, a symlink) that leads outside its folder; `sha256_file` hashes only regular files.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from edgeseg.errors import EdgesegError

log = logging.getLogger("edgeseg.files")

TMP_PREFIX = ".edgeseg-tmp-"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# .edgeseg-tmp-<pid>-<host>-<tag>...   or, for a folder moved aside while its replacement moves in,
# .edgeseg-tmp-<pid>-<host>.old.<name>
_TMP_RE = re.compile(r"^\.edgeseg-tmp-(\d+)-([0-9a-f]{8})(?:\.old\.(.+)|-)")
# one path component of an artifact: what the manifest schema allows too (tests keep them equal)
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


class UnsafePathError(EdgesegError, ValueError):
    """A path that leaves its folder, or a file that is not a regular file."""


# -- temporaries -----------------------------------------------------------------------------
def _owner() -> str:
    return f"{TMP_PREFIX}{os.getpid()}-{_HOST}"


def temp_prefix(tag: str = "") -> str:
    """The name prefix of this process's temporaries (`tag` says what it is for)."""
    return f"{_owner()}-{tag}"


def make_temp_dir(parent: str | os.PathLike, tag: str) -> Path:
    """A new temporary folder in `parent`, named so `clean_stale_temps` knows its owner."""
    return Path(tempfile.mkdtemp(prefix=temp_prefix(f"{tag}-"), dir=parent))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would signal it there; never guess: keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists (another user's)
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove the temporaries in `folder` left by edgeseg processes of this machine that are gone.

    A folder that was moved aside to be replaced (`.old.`) is put back when the replacement never
    arrived, so a kill between the two renames of `atomic_path` loses nothing. Returns the names handled."""
    folder = Path(folder)
    handled = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return handled
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if not m or m.group(2) != _HOST or _alive(int(m.group(1))):
            continue
        path = Path(entry.path)
        original = m.group(3)
        try:
            if original and not (folder / original).exists():
                os.replace(path, folder / original)
                log.warning("restored %s, left aside by an interrupted edgeseg write (process %s)", folder / original, m.group(1))
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as e:
            log.warning("cannot remove the stale temporary %s: %s", path, e)
            continue
        handled.append(entry.name)
    if handled:
        log.info("removed %d stale temporaries from %s: %s", len(handled), folder, ", ".join(handled))
    return handled


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success move it into place, on error remove it.

    Works for files and folders (e.g. an .mlpackage): a half-built artifact never appears at `dest`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = make_temp_dir(dest.parent, dest.name)
    tmp = tmpdir / (dest.name + suffix)
    try:
        yield tmp
        if not tmp.exists():
            raise EdgesegError(f"nothing was written for {dest}")
        if dest.is_dir() and not dest.is_symlink():
            old = dest.with_name(f"{_owner()}.old.{dest.name}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_text_atomic(dest: str | os.PathLike, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())


# -- reading ---------------------------------------------------------------------------------
def read_bounded(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes; a FIFO, a device, a folder or a larger
    file is refused without blocking or reading it."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except IsADirectoryError:
        raise UnsafePathError(f"{what} {path} is a folder, not a file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{what} {path} is not a regular file ({_kind(st.st_mode)}); replace it with the real file")
        if st.st_size > limit:
            raise UnsafePathError(f"{what} {path} is {st.st_size} bytes, more than the {limit} allowed; it is not what edgeseg wrote")
        chunks, left = [], limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise UnsafePathError(f"{what} {path} grew past {limit} bytes while being read")
        return data
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def relative_path_problem(rel) -> str | None:
    """Why `rel` is not a plain relative path inside a folder ('/'-separated names of letters,
    digits and _.+-, none starting with a dot), or None. The manifest schema has the same rule."""
    if not isinstance(rel, str) or not rel:
        return "the path is empty"
    if rel.startswith("/") or PurePosixPath(rel).is_absolute() or re.match(r"^[A-Za-z]:", rel) or "\\" in rel:
        return "the path is absolute or uses '\\'; artifact paths are relative to the bundle folder"
    parts = rel.split("/")
    if ".." in parts:
        return "the path climbs out of the bundle with '..'"
    if any(not _COMPONENT.match(p) for p in parts):
        return "the path is not normalised ('.', empty or hidden components, or characters other than letters, digits and _.+-)"
    if len(rel) > 255:
        return "the path is longer than 255 characters"
    return None


def contained(root: str | os.PathLike, rel: str, what: str = "path") -> Path:
    """`root / rel`, checked: a plain relative path (see `relative_path_problem`) that, with every
    symlink resolved, stays inside `root`. Raises UnsafePathError naming `what` otherwise."""
    why = relative_path_problem(rel)
    if why:
        raise UnsafePathError(f"{what} {rel!r} is refused: {why}")
    root = Path(root)
    real_root = root.resolve()
    real = (root / rel).resolve()
    if real != real_root and real_root not in real.parents:
        raise UnsafePathError(f"{what} {rel!r} is refused: it is a symlink to {real}, outside {root}; "
                              "copy the file into the bundle instead of linking to it")
    return root / rel


def check_tree(path: Path, what: str) -> os.stat_result:
    """`path` is a regular file, or a folder holding only regular files and folders
    (no symlinks, FIFOs or devices). Returns its stat."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnsafePathError(f"{what} is listed but missing from the bundle ({path})") from None
    if stat.S_ISREG(st.st_mode):
        return st
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{what} is {_kind(st.st_mode)}, not a file; the bundle is damaged or tampered with")
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in dirnames + filenames:
            st_in = os.lstat(os.path.join(dirpath, name))
            if not (stat.S_ISREG(st_in.st_mode) or stat.S_ISDIR(st_in.st_mode)):
                inner = Path(dirpath, name).relative_to(path)
                raise UnsafePathError(f"{what} contains {inner}, which is {_kind(st_in.st_mode)}; "
                                      "a folder artifact holds plain files only")
    return st


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a regular file, or of every file in a folder (sorted relative paths + contents).
    Symlinks inside a folder, FIFOs and devices are refused rather than followed or read."""
    path = Path(path)
    h = hashlib.sha256()
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        check_tree(path, f"folder {path}")
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif stat.S_ISREG(st.st_mode):
        files = [path]
    else:
        raise UnsafePathError(f"{path} is {_kind(st.st_mode)}, not a file")
    for f in files:
        if f is not path:
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            left = os.fstat(fh.fileno()).st_size  # a regular file: read what it holds, no more
            while left > 0 and (block := fh.read(min(chunk, left))):
                h.update(block)
                left -= len(block)
    return h.hexdigest()


# -- portable metadata -----------------------------------------------------------------------
# An absolute path inside a string: at its start or after a space, quote, bracket or '='.
_ABS_PATH = re.compile(r"""(?:(?<=^)|(?<=[\s'"(\[=]))(/[^\s'"()\[\],;]*|[A-Za-z]:\\[^\s'"()\[\],;]*)""")


def strip_local_paths(obj, skip: tuple[str, ...] = ()):
    """A copy of JSON-able `obj` in which every absolute path of this machine (its first folder
    exists here: /tmp/..., /home/..., C:\\...) is cut to its last name, so files that travel (a
    bundle's manifest, its reports) say `frames (60 images)`, not where they were made. Paths
    that are not this machine's (`/m/01g317`, a URL's path) stay. Keys in `skip` are kept as is."""
    if isinstance(obj, dict):
        return {k: v if k in skip else strip_local_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strip_local_paths(v) for v in obj]
    if isinstance(obj, str) and ("/" in obj or "\\" in obj):
        return _ABS_PATH.sub(_local_name, obj)
    return obj


def _local_name(m: re.Match) -> str:
    path = m.group(1)
    parts = [p for p in re.split(r"[\\/]", path) if p]
    if not parts:
        return path
    top = parts[0] + "\\" if re.match(r"^[A-Za-z]:$", parts[0]) else "/" + parts[0]
    if len(parts) == 1 and not top.endswith("\\") or not os.path.isdir(top):
        return path  # "/" alone, "/usr"-like single names, or nothing of this machine
    return parts[-1]


__all__ = ["TMP_PREFIX", "UnsafePathError", "temp_prefix", "make_temp_dir", "clean_stale_temps", "atomic_path",
           "write_text_atomic", "read_bounded", "relative_path_problem", "contained", "check_tree", "sha256_file",
           "strip_local_paths"]

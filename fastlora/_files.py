"""Replacing a folder's files all at once: ``save_adapter`` must leave the old adapter or the new one, never a mix.

The new files are written and fsynced in a temporary folder beside the target. A target that does not exist yet
is that folder renamed into place. An existing one is swapped with it in one ``renameat2(RENAME_EXCHANGE)``
(Linux), after hard-linking the target's other files (a README, a tokenizer) into the new folder, so they stay.
Where that cannot be done (a target holding sub-folders, a filesystem or OS without the exchange) the files are
moved into place one at a time, the first of ``names_first_out`` moved out first: a crash in between leaves a
folder that refuses to load (its config missing), not one that loads a mix.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def replace_files(path: str | os.PathLike, files: dict[str, bytes], *, name_first_out: str) -> None:
    """Make ``path`` (a folder, created if missing) hold ``files`` ({file name: bytes}) in place of its files of
    those names, all at once; other entries of ``path`` are kept. ``name_first_out``: the file whose absence makes
    the folder unloadable, taken out first on the one-at-a-time fallback."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a directory")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        for name, data in files.items():
            _write(os.path.join(tmp, name), data)
        if not os.path.isdir(path):
            os.rename(tmp, path)
        elif not _swap(tmp, path, files):
            _one_at_a_time(tmp, path, files, name_first_out)
        _fsync_dir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the old files


def _write(file: str, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap(tmp: str, path: str, files: dict[str, bytes]) -> bool:
    """Exchange ``tmp`` and ``path`` atomically, ``path``'s other files linked into ``tmp`` first; False (nothing
    done to ``path``) where that is not possible here."""
    others = [e for e in os.scandir(path) if e.name not in files]
    if any(e.is_dir(follow_symlinks=False) for e in others):
        return False
    try:
        for e in others:
            os.link(e.path, os.path.join(tmp, e.name), follow_symlinks=False)
    except OSError:
        return False
    _fsync_dir(tmp)
    return exchange(tmp, path)


def exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False if unsupported here."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), a, None, b)


def _one_at_a_time(tmp: str, path: str, files: dict[str, bytes], name_first_out: str) -> None:
    first_out = os.path.join(path, name_first_out)
    if os.path.exists(first_out):
        os.replace(first_out, os.path.join(tmp, name_first_out + ".old"))
    for name in sorted(files, key=lambda n: n == name_first_out):  # name_first_out goes back in last
        os.replace(os.path.join(tmp, name), os.path.join(path, name))

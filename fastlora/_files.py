"""Writing files into a folder so that a failed or killed save never leaves a mix that loads.

The folder itself is never replaced, re-linked, re-permissioned or moved: it may be a mount point (a container
volume), a symlink (``latest -> v1``, written through), read-only, or shared with a server running as another user.
Each file is written inside it under a hidden name (``.<name>.<token>.tmp``; mode as ``open`` gives it, or the
mode of the file it replaces), fsynced, then renamed over its target. The ``commit`` file (the adapter config) is
moved out first (to ``.<name>.<token>.old``) and the new one in last, so while the other files change the folder
has no config, which PEFT and ``load_adapter`` both refuse (``leftovers`` tells ``load_adapter`` that a save did
not finish). The folder is fsynced after every rename, so a crash leaves a prefix of the steps on disk. A step
that raises undoes the earlier ones in reverse (the old files come back from their ``.old`` names) before the
error propagates; hidden files a killed save left are removed by the next save into the folder.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat


def replace_files(path: str | os.PathLike, files: dict[str, bytes], *, commit: str) -> None:
    """Make folder ``path`` (created if missing, as ``os.makedirs``) hold ``files`` ({file name: bytes}) in place of
    its files of those names; its other entries are kept. ``commit``: the file whose absence makes the folder
    unloadable, moved out first and in last. Raises (the folder as it was) if any step fails."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a directory")
    if not os.path.isdir(path):
        os.makedirs(path, exist_ok=True)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    for name in leftovers(path, files):
        _remove(os.path.join(path, name))
    token = secrets.token_hex(4)
    temps = {name: os.path.join(path, f".{name}.{token}.tmp") for name in files}
    try:
        for name, data in files.items():
            _write(temps[name], data, os.path.join(path, name))
        _install(path, temps, commit, token)
    finally:
        for tmp in temps.values():
            _remove(tmp)


def leftovers(path: str | os.PathLike, names) -> list[str]:
    """The hidden files in ``path`` that a save of files ``names`` left behind (temporary or old copies)."""
    pattern = re.compile(r"\.(?:" + "|".join(map(re.escape, names)) + r")\.[0-9a-f]{8}\.(?:tmp|old)")
    try:
        entries = os.listdir(path)
    except OSError:
        return []
    return sorted(e for e in entries if pattern.fullmatch(e))


def _install(path: str, temps: dict[str, str], commit: str, token: str) -> None:
    """Rename ``temps`` into place, ``commit`` out first and in last; on an error, undo and re-raise."""
    def old(name):
        return os.path.join(path, f".{name}.{token}.old")

    moves = []
    if os.path.lexists(os.path.join(path, commit)):
        moves.append((os.path.join(path, commit), old(commit)))
    for name in sorted(temps, key=lambda n: (n == commit, n)):
        target = os.path.join(path, name)
        if name != commit and os.path.lexists(target):
            moves.append((target, old(name)))
        moves.append((temps[name], target))
    done = []
    try:
        for src, dst in moves:
            os.replace(src, dst)
            done.append((src, dst))
            _fsync_dir(path)
    except BaseException as e:
        _undo(path, done, commit, e)
        raise
    for _, dst in moves:
        if dst.endswith(".old"):
            _remove(dst)


def _undo(path: str, done: list[tuple[str, str]], commit: str, error: BaseException) -> None:
    """Reverse the renames ``done``, last first. The first one undone last puts the old ``commit`` file back, so
    if any undo fails, stopping there leaves the folder without it: refused, never a mix."""
    for src, dst in reversed(done):
        try:
            os.replace(dst, src)
        except OSError as e:
            if hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(f"restoring {path} failed too ({e}): it is left without {commit}, so it does not "
                               f"load; the previous files are its hidden '.old' files {leftovers(path, [commit])}")
            break
    try:
        _fsync_dir(path)
    except OSError:
        pass


def _write(file: str, data: bytes, replaces: str) -> None:
    """Write ``file`` (new) and fsync it; mode as ``open`` would give it, or that of ``replaces`` where it exists
    (its owner too, where allowed)."""
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            st = os.stat(replaces)
        except OSError:
            st = None
        if st is not None:
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            own = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (own.st_uid, own.st_gid):
                try:
                    os.fchown(fd, st.st_uid, st.st_gid)
                except OSError:
                    pass
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # a filesystem that cannot sync a folder
            raise
    finally:
        os.close(fd)


def _remove(file: str) -> None:
    try:
        os.unlink(file)
    except OSError:
        pass

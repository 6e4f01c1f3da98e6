"""save_adapter on real folders: it writes the files inside the folder and never replaces, re-links, re-permissions
or strands the folder itself (mount points, symlinks, modes, read-only folders), and a save that fails or crashes at
any step leaves the old adapter, the new one, or a folder that load_adapter refuses, never a mix that loads
(docs/design.md, "Failure behaviour")."""

import os
import shutil
import stat
import subprocess
import tempfile

import pytest
import torch
import torch.nn as nn

import fastlora
from fastlora import _files
from fastlora.adapters import CONFIG_NAME, WEIGHTS_NAME

pytest.importorskip("safetensors")

INTERRUPTED = "save_adapter into it did not finish"


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.q_proj, self.v_proj = nn.Linear(16, 12), nn.Linear(12, 8)


def adapter(alpha, seed):
    model = Two()
    fastlora.inject(model, ["q_proj", "v_proj"], r=4, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def adapter_of(model):
    """What a load must reproduce exactly: every layer's lora_A, lora_B and scaling."""
    return {name: (m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.scaling)
            for name, m in model.named_modules() if isinstance(m, fastlora.Linear)}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
                                        and a[k][2] == b[k][2] for k in a)


def loads(path):
    model = Two()
    fastlora.load_adapter(model, path)
    return adapter_of(model)


OLD, NEW = adapter(8, 1), adapter(32, 7)  # configs and weights both differ


def tree(path):
    """{relative name: bytes, or None for a folder} of everything under ``path``, hidden files included."""
    out = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path)] = None
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), path)] = fh.read()
    return out


def plant(path, files):
    os.makedirs(path)
    for name, data in sorted(files.items(), key=lambda kv: kv[0]):
        if data is None:
            os.makedirs(os.path.join(path, name), exist_ok=True)
        else:
            os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
            with open(os.path.join(path, name), "wb") as f:
                f.write(data)


USER = {"README.md": b"mine", ".git": None, ".git/HEAD": b"ref: refs/heads/main\n", "checkpoint-1": None,
        "checkpoint-1/x.bin": b"\0\1"}


@pytest.fixture(params=["flat", "sub-folders"])
def folder(tmp_path, request):
    """An adapter folder holding OLD and a README; "sub-folders": also a .git/ and a checkpoint-1/ (the old
    one-file-at-a-time fallback)."""
    path = tmp_path / "ad"
    fastlora.save_adapter(OLD, path)
    user = USER if request.param == "sub-folders" else {"README.md": USER["README.md"]}
    for name, data in user.items():
        if data is None:
            (path / name).mkdir()
        else:
            (path / name).write_bytes(data)
    return path


def user_files(t):
    return {k: v for k, v in t.items() if k in USER}


def failing(monkeypatch, name, k, persistent):
    """Make call k (1-based) of ``os.<name>`` / ``_files._write`` raise ENOSPC (and every later one: persistent)."""
    owner = _files if name == "_write" else os
    real, calls = getattr(owner, name), []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == k or (persistent and len(calls) > k):
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, fake)
    return calls


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "from-then-on"])
@pytest.mark.parametrize("op", ["_write", "fsync", "replace", "rename"])
def test_a_failure_at_every_step_leaves_old_or_refused_never_a_mix(folder, monkeypatch, op, persistent):
    """Fail the k-th write/fsync/rename of a save, for every k. One failure: the folder is exactly as before (the
    old adapter loads). Failures from then on (the undo fails too): the old adapter, or a folder load_adapter refuses.
    Never the new weights under the old config, never a user file touched, no temporary file left visible."""
    before = tree(folder)
    steps = 0
    for k in range(1, 50):
        with monkeypatch.context() as m:
            calls = failing(m, op, k, persistent)
            try:
                fastlora.save_adapter(NEW, folder)
            except OSError as e:
                assert "No space left" in str(e)
                failed = True
            else:
                failed = False
        after = tree(folder)
        assert user_files(after) == user_files(before), k
        if not failed:  # k is past the last call: the save went through
            assert len(calls) < k and same(loads(folder), adapter_of(NEW))
            assert set(after) == set(before)
            break
        steps += 1
        if not persistent:
            assert after == before, k
        else:
            try:
                assert same(loads(folder), adapter_of(OLD)), k
            except FileNotFoundError as e:
                assert INTERRUPTED in str(e) and str(folder) in str(e), k
            fastlora.save_adapter(OLD, folder)  # the next save cleans up: the folder is as before again
            assert tree(folder) == before, k
    assert steps > 0 or op == "rename"  # the save writes, fsyncs and renames; rename: whichever it uses


def test_a_crash_at_every_step_leaves_old_new_or_refused(folder, tmp_path, monkeypatch):
    """A kill between any two steps of a save (the folder as it is on disk just before each rename): it loads the
    old adapter or the new one exactly, or load_adapter refuses it as an unfinished save; the next save finishes it
    and leaves no hidden file behind."""
    crashes, real = [], os.replace

    def replace(src, dst, **kw):
        crashes.append(tree(folder))
        return real(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    fastlora.save_adapter(NEW, folder)
    monkeypatch.undo()
    crashes.append(tree(folder))
    seen = set()
    for i, state in enumerate(crashes):
        path = str(tmp_path / f"crash{i}")
        plant(path, state)
        try:
            got = loads(path)
        except FileNotFoundError as e:
            assert INTERRUPTED in str(e) and path in str(e), i
            seen.add("refused")
        else:
            assert same(got, adapter_of(OLD)) or same(got, adapter_of(NEW)), i
            seen.add("old" if same(got, adapter_of(OLD)) else "new")
        fastlora.save_adapter(NEW, path)
        assert same(loads(path), adapter_of(NEW)) and set(tree(path)) == set(crashes[-1]), i
    assert seen == {"old", "new", "refused"}


def test_leftovers_are_hidden_and_cleaned_up_by_the_next_save(folder):
    names = [f".{WEIGHTS_NAME}.0123abcd.tmp", f".{CONFIG_NAME}.0123abcd.old", f".{WEIGHTS_NAME}.89abcdef.old"]
    mine = [f".{CONFIG_NAME}.bak", ".env", f"{CONFIG_NAME}.0123abcd.tmp"]  # not save_adapter's: kept
    for name in names + mine:
        (folder / name).write_bytes(b"x")
    fastlora.save_adapter(NEW, folder)
    top = [name for name in user_files(tree(folder)) if "/" not in name]
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, WEIGHTS_NAME, *mine, *top])
    assert same(loads(folder), adapter_of(NEW))


def test_symlinked_folder_is_written_through(tmp_path):
    """adapters/latest -> v1: v1 gets the new adapter, latest stays the same link, nothing else appears."""
    fastlora.save_adapter(OLD, tmp_path / "v1")
    os.symlink("v1", tmp_path / "latest")
    inode = os.stat(tmp_path / "v1").st_ino
    fastlora.save_adapter(NEW, tmp_path / "latest")
    assert os.readlink(tmp_path / "latest") == "v1" and os.stat(tmp_path / "v1").st_ino == inode
    assert sorted(os.listdir(tmp_path)) == ["latest", "v1"]
    assert same(loads(tmp_path / "v1"), adapter_of(NEW))


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_modes_follow_the_umask_and_an_existing_folder_keeps_its_own(tmp_path, umask022):
    """As PEFT under umask 022: a new folder is 0755 and new files 0644 (not mkdtemp's 0700). An existing folder
    keeps its mode and identity; an existing file keeps its mode."""
    fastlora.save_adapter(OLD, tmp_path / "a" / "b")
    assert (mode(tmp_path / "a"), mode(tmp_path / "a" / "b")) == (0o755, 0o755)
    assert {mode(tmp_path / "a" / "b" / n) for n in (CONFIG_NAME, WEIGHTS_NAME)} == {0o644}
    path = tmp_path / "a" / "b"
    os.chmod(path, 0o750)
    os.chmod(path / WEIGHTS_NAME, 0o600)
    st = os.stat(path)
    fastlora.save_adapter(NEW, path)
    assert (mode(path), os.stat(path).st_ino, os.stat(path).st_uid) == (0o750, st.st_ino, st.st_uid)
    assert (mode(path / WEIGHTS_NAME), mode(path / CONFIG_NAME)) == (0o600, 0o644)
    assert same(loads(path), adapter_of(NEW))


@pytest.fixture
def as_another_user():
    """A folder tree owned by an unprivileged user, and a context that runs as that user: as root, the effective
    uid drops to nobody (65534) for the block; otherwise we already are one."""
    import contextlib

    root = tempfile.mkdtemp()
    uid = os.geteuid()
    if uid == 0:
        os.chown(root, 65534, 65534)

    @contextlib.contextmanager
    def user():
        if uid != 0:
            yield
            return
        try:
            os.setegid(65534)
            os.seteuid(65534)
        except OSError as e:
            pytest.skip(f"running as root and cannot drop to uid 65534 ({e})")
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)

    yield root, user
    for d, _, _ in os.walk(root):
        os.chmod(d, 0o755)
    shutil.rmtree(root)


def test_read_only_folder_raises_and_is_left_alone(as_another_user):
    """A 0555 folder: PermissionError (as PEFT), and the folder, its adapter and its parent are as they were."""
    root, user = as_another_user
    path = os.path.join(root, "ad")
    with user():
        fastlora.save_adapter(OLD, path)
        os.chmod(path, 0o555)
        before, st = tree(path), os.stat(path)
        with pytest.raises(PermissionError):
            fastlora.save_adapter(NEW, path)
    assert os.listdir(root) == ["ad"] and tree(path) == before
    assert (os.stat(path).st_ino, mode(path)) == (st.st_ino, 0o555)
    assert same(loads(path), adapter_of(OLD))


def mounted(path):
    """Whether ``path`` is a mount point (os.path.ismount misses a bind mount within one filesystem)."""
    with open("/proc/self/mountinfo") as f:
        return os.path.realpath(path) in {line.split()[4].replace("\\040", " ") for line in f}


def test_mount_point_folder(tmp_path):
    """A folder that is a mount point (a container volume): saved into, still mounted. Needs root (mount --bind)."""
    if os.geteuid() != 0 or shutil.which("mount") is None or not os.path.exists("/proc/self/mountinfo"):
        pytest.skip("needs root and mount(8) to bind-mount a folder")
    src, path = tmp_path / "volume", tmp_path / "out"
    src.mkdir()
    path.mkdir()
    r = subprocess.run(["mount", "--bind", str(src), str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount --bind is not allowed here: {r.stderr.strip()}")
    try:
        assert mounted(path)
        fastlora.save_adapter(OLD, path)
        fastlora.save_adapter(NEW, path)
        assert mounted(path) and sorted(os.listdir(path)) == [CONFIG_NAME, WEIGHTS_NAME]
        assert same(loads(path), adapter_of(NEW))
    finally:
        subprocess.run(["umount", str(path)], check=True)
    assert sorted(os.listdir(src)) == [CONFIG_NAME, WEIGHTS_NAME]


def test_peft_loads_the_saved_folder(folder):
    peft = pytest.importorskip("peft")
    fastlora.save_adapter(NEW, folder)
    model = peft.PeftModel.from_pretrained(Two(), str(folder))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.base_model.model.v_proj(model.base_model.model.q_proj(x)),
                                   NEW.v_proj(NEW.q_proj(x)))

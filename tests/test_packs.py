"""Objects written as one pack are valid Git objects that Git and pygit2 read."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pygit2
import trio

from kitci import Store, Transaction
from kitci._packs import BLOB, TREE, PackWriter, maybe_merge_packs


def fsck(git_dir: Path) -> None:
    subprocess.run(
        ["git", "--git-dir", str(git_dir), "fsck", "--strict", "--no-dangling"],
        check=True,
        capture_output=True,
    )


def packs(git_dir: Path) -> list[Path]:
    return sorted((git_dir / "objects" / "pack").glob("pack-*.idx"))


def test_pack_objects_read_back_as_git_writes_them(tmp_path: Path) -> None:
    """Ids, tree order and content match what libgit2 computes itself."""
    repo = pygit2.init_repository(str(tmp_path / "repo"), bare=True)
    writer = PackWriter()
    small = writer.blob(b"hello\n")
    # Larger than one stored deflate block and than the stored-object limit.
    large_data = bytes(range(256)) * 400
    large = writer.blob(large_data)
    empty = writer.blob(b"")
    sub = writer.tree([(b"x", 0o100644, large)])
    # "a" (a directory) sorts after "a.txt" because Git compares it as "a/".
    root = writer.tree(
        [(b"b", 0o100644, small), (b"a", 0o040000, sub), (b"a.txt", 0o100644, empty)]
    )
    commit = writer.commit(root, [], "title\n\nbody", "kitci", "k@l", 1_700_000_000)
    writer.write(tmp_path / "repo" / "objects")
    assert len(writer) == 0

    assert repo.create_blob(b"hello\n").raw == small
    assert repo.create_blob(large_data).raw == large
    builder = repo.TreeBuilder()
    builder.insert("x", pygit2.Oid(raw=large), pygit2.enums.FileMode.BLOB)
    assert builder.write().raw == sub
    read = repo[pygit2.Oid(raw=commit)].peel(pygit2.Commit)
    assert read.message == "title\n\nbody"
    assert [e.name for e in read.tree] == ["a.txt", "a", "b"]
    blob = read.tree["a/x"]
    assert isinstance(blob, pygit2.Blob)
    assert blob.data == large_data
    repo.create_reference_direct("refs/heads/main", read.id, False)
    fsck(tmp_path / "repo")


async def test_a_large_commit_goes_into_one_pack(tmp_path: Path) -> None:
    """A transaction of many files is written as a pack, a small one loose."""
    git_dir = tmp_path / "store"
    store = await Store.open(git_dir, create=True)
    tx = Transaction(None)
    for i in range(200):
        tx.write(f"dir{i % 7}/file{i}", f"content {i}\n")
    first = await store.commit("main", tx, "many files")
    assert first is not None
    small = Transaction(first)
    small.write("dir0/f0", "changed\n")
    assert await store.commit("main", small, "one file") is not None

    assert len(packs(git_dir)) == 1
    fsck(git_dir)
    git = ["git", "--git-dir", str(git_dir), "show"]
    shown = await trio.run_process(
        [*git, "main:dir3/file10", "main:dir0/f0"], capture_stdout=True
    )
    assert shown.stdout == b"content 10\nchanged\n"


def test_many_packs_are_merged(tmp_path: Path) -> None:
    """Once 32 packs pile up, they are merged so lookups stay fast."""
    git_dir = tmp_path / "repo"
    pygit2.init_repository(str(git_dir), bare=True)
    ids = []
    for i in range(32):
        writer = PackWriter()
        ids.append(writer.add(BLOB, f"blob {i}\n".encode()))
        writer.add(TREE, b"")
        writer.write(git_dir / "objects")
    assert len(packs(git_dir)) == 32
    maybe_merge_packs(git_dir)
    assert len(packs(git_dir)) < 32
    repo = pygit2.Repository(str(git_dir))
    assert all(pygit2.Oid(raw=oid) in repo for oid in ids)

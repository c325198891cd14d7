"""Write many new Git objects as one pack file instead of loose objects.

libgit2 writes every new object as its own zlib-compressed file, which
costs a file creation per blob, tree and commit. A flush of ten thousand
statuses creates tens of thousands of objects, so the store collects them
in a `PackWriter` and writes one pack and its index, as `git fast-import`
does. Small objects are stored without compression (zlib's set-up costs
more than the bytes it saves); `git gc` compresses them later.

Only the store's thread uses a writer; it holds plain bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

__all__ = ["BLOB", "COMMIT", "TREE", "PackWriter", "tree_entry_key"]

COMMIT = 1
TREE = 2
BLOB = 3
_NAMES = {COMMIT: b"commit", TREE: b"tree", BLOB: b"blob"}
_DIR_MODE = 0o040000
# Objects smaller than this are stored, not deflated.
_STORE_BELOW = 4096
# Merge packs once there are this many, so lookups stay fast.
_MAX_PACKS = 32


def _zlib_stored(data: bytes) -> bytes:
    """Return a zlib stream holding `data` in uncompressed deflate blocks."""
    out = [b"\x78\x01"]
    length = len(data)
    start = 0
    while True:
        chunk = data[start : start + 65535]
        start += len(chunk)
        final = 1 if start >= length else 0
        out.append(bytes([final]) + struct.pack("<HH", len(chunk), len(chunk) ^ 0xFFFF))
        out.append(chunk)
        if final:
            break
    out.append(struct.pack(">I", zlib.adler32(data)))
    return b"".join(out)


def tree_entry_key(name: bytes, mode: int) -> bytes:
    """Return the key Git sorts tree entries by (directories end in `/`)."""
    return name + b"/" if mode == _DIR_MODE else name


class PackWriter:
    """Collect new objects, then write them as one pack with `write`.

    The first `keep` objects are kept in memory (a small commit may rather
    write them loose: see `drain`); past that, and when `objects_dir` is
    given, objects go straight into a temporary pack file, so a writer of a
    hundred thousand objects does not hold them all. `write` completes the
    pack; `discard` (or leaving the `with` block without `write`) removes
    the temporary file. Use a writer once.
    """

    def __init__(self, objects_dir: Path | None = None, *, keep: int = 64) -> None:
        self._objects_dir = objects_dir
        self._keep = keep
        # Objects not yet in the pack file, by binary id: (type, content).
        self._pending: dict[bytes, tuple[int, bytes]] = {}
        # Objects already in the pack file: (id, CRC-32, offset), and ids.
        self._entries: list[tuple[bytes, int, int]] = []
        self._written: set[bytes] = set()
        self._file: BinaryIO | None = None
        self._tmp_pack: str | None = None
        self._offset = 0

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()

    def __len__(self) -> int:
        return len(self._pending) + len(self._entries)

    def __contains__(self, oid: bytes) -> bool:
        return oid in self._pending or oid in self._written

    @property
    def streaming(self) -> bool:
        """True once objects are being written to the pack file."""
        return self._file is not None

    def add(self, kind: int, data: bytes) -> bytes:
        """Add an object of `kind` (BLOB, TREE or COMMIT); return its id."""
        oid = hashlib.sha1(b"%s %d\0" % (_NAMES[kind], len(data)) + data).digest()
        if oid in self._pending or oid in self._written:
            return oid
        if self._file is None:
            self._pending[oid] = (kind, data)
            if len(self._pending) > self._keep and self._objects_dir is not None:
                self._start()
        else:
            self._append(oid, kind, data)
        return oid

    def drain(self) -> list[tuple[int, bytes]]:
        """Return and forget the objects kept in memory, as (type, content).

        Only for a writer that has not started its pack file.
        """
        if self._file is not None:
            raise RuntimeError("the objects are in the pack file already")
        objects = list(self._pending.values())
        self._pending.clear()
        return objects

    def blob(self, data: bytes) -> bytes:
        return self.add(BLOB, data)

    def tree(self, entries: Iterable[tuple[bytes, int, bytes]]) -> bytes:
        """Add a tree of (name, file mode, binary id) entries, in any order."""
        ordered = sorted(entries, key=lambda e: tree_entry_key(e[0], e[1]))
        body = b"".join(b"%o %s\0%s" % (mode, name, oid) for name, mode, oid in ordered)
        return self.add(TREE, body)

    def commit(
        self,
        tree: bytes,
        parents: Iterable[bytes],
        message: str,
        name: str,
        email: str,
        when: int,
    ) -> bytes:
        """Add a commit of `tree` (binary ids throughout); return its id."""
        lines = [b"tree " + tree.hex().encode()]
        lines += [b"parent " + p.hex().encode() for p in parents]
        who = f"{name} <{email}> {when} +0000".encode()
        lines += [b"author " + who, b"committer " + who]
        body = b"\n".join(lines) + b"\n\n" + message.encode("utf-8")
        return self.add(COMMIT, body)

    def _start(self) -> None:
        """Open the temporary pack file and move the kept objects into it."""
        if self._objects_dir is None:
            raise ValueError("a PackWriter needs objects_dir to write a pack")
        pack_dir = self._objects_dir / "pack"
        pack_dir.mkdir(parents=True, exist_ok=True)
        fd, self._tmp_pack = tempfile.mkstemp(dir=pack_dir, prefix="tmp_pack_")
        self._file = os.fdopen(fd, "w+b")
        # The object count is not known yet: it is filled in by `write`.
        self._file.write(b"PACK" + struct.pack(">II", 2, 0))
        self._offset = 12
        pending, self._pending = self._pending, {}
        for oid, (kind, data) in pending.items():
            self._append(oid, kind, data)

    def _append(self, oid: bytes, kind: int, data: bytes) -> None:
        assert self._file is not None
        record = _object_header(kind, len(data)) + (
            _zlib_stored(data) if len(data) < _STORE_BELOW else zlib.compress(data, 1)
        )
        self._file.write(record)
        self._entries.append((oid, zlib.crc32(record), self._offset))
        self._written.add(oid)
        self._offset += len(record)

    def write(self, objects_dir: Path | None = None) -> None:
        """Complete the pack and its index under `objects_dir/pack`.

        The pack is written under a temporary name and its index is renamed
        into place last, so readers never see a half-written pack.
        """
        if objects_dir is not None:
            self._objects_dir = objects_dir
        if self._file is None:
            if not self._pending:
                return
            self._start()
        assert self._file is not None
        assert self._tmp_pack is not None
        out = self._file
        out.seek(8)
        out.write(struct.pack(">I", len(self._entries)))
        out.flush()
        out.seek(0)
        sha = hashlib.sha1()
        while chunk := out.read(1 << 20):
            sha.update(chunk)
        pack_sha = sha.digest()
        out.seek(0, os.SEEK_END)
        out.write(pack_sha)
        out.close()
        pack_dir = Path(self._tmp_pack).parent
        name = f"pack-{pack_sha.hex()}"
        fd_idx, tmp_idx = tempfile.mkstemp(dir=pack_dir, prefix="tmp_idx_")
        try:
            with os.fdopen(fd_idx, "wb") as index_file:
                index_file.write(_index(self._entries, pack_sha))
            os.chmod(self._tmp_pack, 0o444)
            os.chmod(tmp_idx, 0o444)
            os.replace(self._tmp_pack, pack_dir / f"{name}.pack")
            self._tmp_pack = None
            os.replace(tmp_idx, pack_dir / f"{name}.idx")
        except BaseException:
            if os.path.exists(tmp_idx):
                os.unlink(tmp_idx)
            raise
        finally:
            self._file = None
        self._entries = []
        self._written.clear()

    def discard(self) -> None:
        """Forget every object and remove an unfinished pack file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp_pack is not None and os.path.exists(self._tmp_pack):
            os.unlink(self._tmp_pack)
        self._tmp_pack = None
        self._pending.clear()
        self._entries = []
        self._written.clear()


def _object_header(kind: int, size: int) -> bytes:
    byte = (kind << 4) | (size & 0x0F)
    size >>= 4
    out = bytearray()
    while size:
        out.append(byte | 0x80)
        byte = size & 0x7F
        size >>= 7
    out.append(byte)
    return bytes(out)


def _index(entries: list[tuple[bytes, int, int]], pack_sha: bytes) -> bytes:
    """Return a version-2 pack index for `entries`."""
    entries.sort()
    fanout = [0] * 256
    for oid, _, _ in entries:
        fanout[oid[0]] += 1
    total = 0
    counts = []
    for count in fanout:
        total += count
        counts.append(total)
    large: list[int] = []
    offsets = []
    for _, _, offset in entries:
        if offset < 0x80000000:
            offsets.append(struct.pack(">I", offset))
        else:
            offsets.append(struct.pack(">I", 0x80000000 | len(large)))
            large.append(offset)
    body = b"".join(
        [
            b"\xfftOc",
            struct.pack(">I", 2),
            struct.pack(">256I", *counts),
            b"".join(oid for oid, _, _ in entries),
            b"".join(struct.pack(">I", crc) for _, crc, _ in entries),
            b"".join(offsets),
            b"".join(struct.pack(">Q", offset) for offset in large),
            pack_sha,
        ]
    )
    return body + hashlib.sha1(body).digest()


def maybe_merge_packs(git_dir: Path) -> None:
    """Merge small packs with `git repack --geometric` once there are many.

    Runs `git` as a subprocess (on the store's thread); a failure is
    reported as `OSError`/`CalledProcessError` to the caller.
    """
    packs = list((git_dir / "objects" / "pack").glob("pack-*.idx"))
    if len(packs) < _MAX_PACKS:
        return
    subprocess.run(
        ["git", "--git-dir", str(git_dir), "repack", "-d", "-q", "--geometric=2"],
        check=True,
        capture_output=True,
    )

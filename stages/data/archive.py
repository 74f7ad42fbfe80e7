"""An ImageFolder tree inside a tar archive (plain, .gz, .bz2 or .xz), read in one forward pass.

Where the classes are, the same rule for every archive whatever its packing (`tar -C root .`, `./`
prefixes, a wrapping directory like ../shared's `train/<class>/...`):
- member names are normalised (leading `/` and `./` dropped) and hidden entries skipped, as in a folder;
- the ImageFolder root is the deepest directory that holds every image, so wrapping directories are
  unwrapped whatever their depth;
- the classes are the root's sub-directories, and an image anywhere below a class directory belongs to
  that class (`cats/kaggle/b.png` is a cat), as in a folder;
- images directly in the root: at the archive's top they belong to no class and are left out (as a
  folder's files beside its class directories); a directory that holds only images is the one class of a
  single-class archive; a directory that holds both images and image sub-directories is refused, since it
  reads either as a root with stray files or as one class with nested folders.
A tree archived from inside one class directory whose images all sit in sub-folders cannot be told from
an ImageFolder root and is read as one (as a folder would be): archive the root above the classes.

Links: hard links and symbolic links to an image inside the archive are read as that image (a folder walk
follows links too); links that point outside the archive are skipped.

Reading: the archive is decompressed once, front to back. A compressed archive's image members are copied
into an uncompressed scratch file as they pass, so the shuffled reads that follow never seek back into
the compressed stream (a gzip stream has no random access: each backward seek decompresses again from the
start, which made a .tar.gz ~15x slower than the same .tar); a plain archive is read in place.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from tqdm import tqdm

from stages.data.sources import IMG_EXTENSIONS, Source, is_image, make_items

# magic bytes -> opener of the decompressed stream; anything else is read as a plain tar
_DECOMPRESSORS = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


def normalise_member(name: str) -> str | None:
    """A tar member name as a relative POSIX path ("./a//b" -> "a/b"), None for hidden or escaping ones."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(p.startswith(".") for p in parts):
        return None  # hidden entries (and "..") are skipped, as the folder walk skips hidden directories
    return "/".join(parts)


def _link_target(link: tarfile.TarInfo) -> str | None:
    """The normalised member a hard link (named from the archive's top) or a symlink (relative to its own
    directory, or absolute from the top) points to."""
    if link.islnk():
        return normalise_member(link.linkname)
    base = posixpath.dirname(link.name.lstrip("/")) if not link.linkname.startswith("/") else ""
    return normalise_member(posixpath.normpath(posixpath.join(base, link.linkname.lstrip("/"))))


def _open_stream(path: Path):
    """(the decompressed byte stream of `path`, whether it was compressed)."""
    with open(path, "rb") as f:
        magic = f.read(6)
    for prefix, opener in _DECOMPRESSORS.items():
        if magic.startswith(prefix):
            return opener(path, "rb"), True
    return open(path, "rb"), False


class _Recorder:
    """A forward-only reader that keeps the last `keep` bytes it passed on.

    tarfile's stream mode stops silently at a truncated or damaged header past the first one; this lets
    the caller look at the bytes where it stopped.
    """

    def __init__(self, f, keep: int = 1 << 16):
        self.f, self.keep = f, keep
        self.window = bytearray()
        self.end = 0  # stream offset just past the window

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.window += data
        del self.window[: max(0, len(self.window) - self.keep)]
        self.end += len(data)
        return data

    def at(self, offset: int, n: int) -> bytes | None:
        """Bytes [offset, offset + n) of the stream (fewer at its end); None if they already left the window."""
        while self.end < offset + n and self.read(1 << 14):
            pass
        start = offset - (self.end - len(self.window))
        return None if start < 0 else bytes(self.window[start : start + n])


class TarSource(Source):
    """An ImageFolder tree inside a tar archive; the class level follows the module docstring's rule."""

    kind = "tar"

    def __init__(self, path: Path, scratch: Path | None = None, progress: bool = False):
        self.path = path
        self._file = None
        try:
            found = self._scan(path, scratch, progress)
            root = self._root(path, list(found))
        except BaseException:
            self.close()
            raise
        strip = len(root) + 1 if root else 0
        per_class: dict[str, list[tuple[str, str]]] = {}
        for relative, (member, _, _) in found.items():
            if root and not relative.startswith(root + "/"):
                continue
            inside = relative[strip:]
            if "/" in inside:
                per_class.setdefault(inside.split("/", 1)[0], []).append((member, inside))
        if not per_class:
            self.close()
            raise ValueError(f"tar {path} has no images in class directories (expected [<root>/]<class>/<image>)")
        self.classes = sorted(per_class)
        self.items = make_items([per_class[c] for c in self.classes])
        self._where = {member: (offset, size) for member, offset, size in found.values()}

    def _scan(self, path: Path, scratch: Path | None, progress: bool) -> dict[str, tuple[str, int, int]]:
        """{normalised name: (member name, offset, size)} of the image members, in one pass.

        Offsets are into the archive itself when it is plain, into the scratch copy when compressed.
        """
        found: dict[str, tuple[str, int, int]] = {}
        links: list[tuple[str, tarfile.TarInfo]] = []
        member = None
        stream, compressed = _open_stream(path)
        # a plain archive is read in place later; a compressed one from its uncompressed scratch copy
        self._file = tempfile.TemporaryFile(dir=scratch) if compressed else open(path, "rb")
        recorder = _Recorder(stream)
        try:
            with stream, tarfile.open(fileobj=recorder, mode="r|") as tar:
                for member in tqdm(tar, desc=f"read {path.name}", unit="file", disable=not progress):
                    tar.members = []  # stream mode keeps every header otherwise (webdataset does the same)
                    relative = normalise_member(member.name)
                    if relative is None or not is_image(relative):
                        continue
                    if member.islnk() or member.issym():
                        links.append((relative, member))
                        continue
                    if not member.isreg():
                        continue
                    offset = member.offset_data
                    if compressed:
                        offset = self._file.seek(0, os.SEEK_END)
                        shutil.copyfileobj(tar.extractfile(member), self._file, 1 << 20)
                    # a name stored twice is extracted as its last copy: keep that one
                    found[relative] = (member.name, offset, member.size)
                _check_end(path, recorder, tar.offset, member)
            for relative, link in links:  # a link shares its target's content, as a folder walk follows it
                target = _link_target(link)
                if target in found and relative not in found:
                    found[relative] = (link.name, *found[target][1:])
        except _READ_ERRORS as exn:
            if member is not None and member.offset_data + member.size > recorder.end:
                raise ValueError(f"tar {path} is truncated: it ends inside member {member.name!r} ({exn})") from exn
            if isinstance(exn, EOFError):
                raise ValueError(f"tar {path} is truncated: its compressed stream ends early ({exn})") from exn
            where = f" after member {member.name!r}" if member is not None else ""
            raise ValueError(f"tar {path} cannot be read{where}: {exn}") from exn
        if not found:
            raise ValueError(f"no images in tar {path} ({', '.join(IMG_EXTENSIONS)})")
        return found

    @staticmethod
    def _root(path: Path, names: list[str]) -> str:
        """The ImageFolder root inside the archive ("" for its top), by the module docstring's rule."""
        dirs = [n.split("/")[:-1] for n in names]
        common = dirs[0]
        for d in dirs[1:]:
            n = 0
            while n < min(len(common), len(d)) and common[n] == d[n]:
                n += 1
            common = common[:n]
        depth = len(common)
        direct = [n for n, d in zip(names, dirs) if len(d) == depth]
        if not direct or depth == 0:
            return "/".join(common)
        nested = sorted({d[depth] for d in dirs if len(d) > depth})
        if not nested:
            return "/".join(common[:-1])  # a single-class archive: the directory is the class
        raise ValueError(
            f"tar {path}: {'/'.join(common)!r} holds images directly ({direct[0]!r}) and in sub-directories "
            f"({', '.join(nested[:5])}): it is either an ImageFolder root with stray files or one class with "
            f"nested folders; archive the tree as root/<class>/.../<image> without images beside the classes"
        )

    def read(self, index: int) -> bytes:
        offset, size = self._where[self.items[index].name]
        self._file.seek(offset)
        return self._file.read(size)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _check_end(path: Path, recorder: _Recorder, end: int, last: tarfile.TarInfo | None) -> None:
    """Where tarfile stopped must be the end-of-archive marker (a zero block): otherwise members after it
    would be lost without a word. A marker cut short loses nothing and is accepted, as GNU tar does."""
    after = f"after member {last.name!r}" if last is not None else "before its first member"
    if last is not None and last.offset_data + last.size > recorder.end:
        raise ValueError(f"tar {path} is truncated: it ends inside member {last.name!r}")
    block = recorder.at(end, tarfile.BLOCKSIZE)
    if block is None or not block.strip(b"\0") and (block or last is None):
        return
    if not block:
        raise ValueError(f"tar {path} is truncated: it ends {after} without the end-of-archive marker")
    if len(block) < tarfile.BLOCKSIZE:
        raise ValueError(f"tar {path} is truncated: it ends inside the header {after}")
    raise ValueError(f"tar {path} is damaged: the header {after} (byte {end} of the tar stream) is not valid")

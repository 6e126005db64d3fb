"""Packed image folders in Swin-Transformer's format (the release's ``--zip``): an archive per split and a map.

``DATA.DATA_PATH`` holds ``train.zip`` and ``val.zip`` with, beside each, ``train_map.txt`` / ``val_map.txt``:
one line per image, ``<member path inside the archive><TAB><label>``, in dataset order. Swin names an image
``train.zip@/<member>``; error lines here do too. ``tools/make_zip_dataset.py`` packs an image-folder tree so.

Members are read without extracting anything. The archive's directory is read once, when the dataset is
built; each process (a loader worker, or the main process) then opens the archive once and reads a member
with two positioned reads (its local header, then its bytes), never parsing the directory again; Swin's
reader parses it in every worker, which for ImageNet's 1.28 M members costs seconds and hundreds of MB each.
Members stored or deflated are read; their CRC-32 is checked. The archive's directory is not trusted: a member
whose declared sizes run past the archive's data, disagree, or exceed DATA.ZIP_MAX_MEMBER_MB is marked when the
dataset is built, and inflating stops at the declared size (a zip bomb inflates no further), so such a member is
an unreadable image, named and passed over like a damaged file, never an out-of-memory end.

DATA.CACHE_MODE (Swin's ``--cache-mode``): "no" reads members from the archive on demand; "part" holds in
memory the members this process reads (training: those with index % world_size == rank, which the training
sampler then keeps giving it; validation: its shard); "full" holds every member. The cache is one buffer,
shared by forked loader workers without copies.
"""

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .datasets import DataError, EncodedImage, UnreadableImageError, describe_error

ZIP_LAYOUT = ("train.zip and val.zip, each with a map file beside it (train_map.txt: one 'PATH<TAB>LABEL' line "
              "per image), as tools/make_zip_dataset.py writes them")

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we do not need, name length, extra length
_READABLE_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}


def read_map(path: str) -> tuple[list[str], list[int]]:
    """(member paths, labels) of a map file, in its order; a malformed line is a DataError naming it."""
    members: list[str] = []
    labels: list[int] = []
    try:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                member, tab, label = line.rpartition("\t")
                if not tab or not member or not label.isdigit():
                    raise DataError(f"{path} line {number}: expected 'PATH<TAB>LABEL' with a label of 0 or more, "
                                    f"got {line!r}; re-pack the data with tools/make_zip_dataset.py")
                members.append(member)
                labels.append(int(label))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; expected 'PATH<TAB>LABEL' lines") from None
    if not members:
        raise DataError(f"{path} lists no images; expected 'PATH<TAB>LABEL' lines")
    return members, labels


def class_names(members: list[str], labels: list[int], map_path: str, root: str) -> list[str]:
    """The class name of each label: the folder its members are in (``<class>/<file>``), as ImageFolder names
    classes. Swin's validation map lists bare file names; their names are then those of ``train_map.txt``
    beside it, or the label numbers when there is none."""
    folders = [member.split("/", 1)[0] if "/" in member else "" for member in members]
    if not any(folders):
        train_map = os.path.join(root, "train_map.txt")
        if os.path.abspath(train_map) != os.path.abspath(map_path) and os.path.isfile(train_map):
            names, source = class_names(*read_map(train_map), train_map, root), train_map
        else:
            names, source = [str(label) for label in range(max(labels) + 1)], map_path
        if max(labels) >= len(names):
            raise DataError(f"{map_path} has label {max(labels)} but {source} names only {len(names)} classes")
        return names
    if not all(folders):
        flat = members[folders.index("")]
        raise DataError(f"{map_path}: {flat} is not in a class folder while other images are; expected every "
                        "path to be <class>/<file> (or none, as Swin's val_map.txt)")
    by_label: dict[int, str] = {}
    for folder, label in zip(folders, labels, strict=True):
        if by_label.setdefault(label, folder) != folder:
            raise DataError(f"{map_path}: label {label} is given to images of both {by_label[label]}/ and {folder}/; "
                            "each class folder needs one label of its own")
    if len(set(by_label.values())) != len(by_label):
        folder = next(f for f in by_label.values() if list(by_label.values()).count(f) > 1)
        raise DataError(f"{map_path}: the images of {folder}/ have several labels; each class folder needs one")
    missing = sorted(set(range(len(by_label))) - set(by_label))
    if missing:
        raise DataError(f"{map_path}: labels must be 0..{len(by_label) - 1}, one per class folder, but "
                        f"{missing[:5]} are missing")
    return [by_label[label] for label in range(len(by_label))]


def _directory(zip_path: str) -> tuple[dict[str, zipfile.ZipInfo], int]:
    """The archive's members by name, and where its directory starts (the members' data all lie before it)."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            return archive.NameToInfo, archive.start_dir
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{zip_path} is not a readable zip archive ({describe_error(err)}); re-pack it with "
                        "tools/make_zip_dataset.py") from None


def _size_problem(info: zipfile.ZipInfo, data_end: int, max_bytes: int) -> str:
    """Why a member's declared sizes cannot be trusted, or "" when they can."""
    if info.header_offset + _LOCAL_HEADER.size + info.compress_size > data_end:
        return (f"its directory entry declares {info.compress_size} bytes at offset {info.header_offset}, past the "
                f"{data_end} bytes of member data; the archive's directory is damaged")
    if info.file_size > max_bytes:
        return (f"it declares {info.file_size / 2**20:.1f} MiB uncompressed, more than DATA.ZIP_MAX_MEMBER_MB "
                f"{max_bytes / 2**20:g}")
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        return (f"a stored member declares {info.compress_size} bytes stored and {info.file_size} uncompressed; the "
                "archive's directory is damaged")
    return ""


def _inflate(data: bytes | memoryview, size: int) -> bytes:
    """Raw deflate data (as zip stores it) inflated to its declared ``size``, never further: a member that would
    inflate past it (a zip bomb, a damaged size field) is refused after ``size + 1`` bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = inflater.decompress(data, size + 1)
    if len(inflated) > size:
        raise zipfile.BadZipFile(f"it inflates past the {size} bytes its directory declares (a damaged archive or a "
                                 "zip bomb)")
    if len(inflated) < size:
        raise zipfile.BadZipFile(f"it inflates to {len(inflated)} bytes, its directory declares {size}")
    return inflated


class ZipImageFolder(Dataset):
    """One split of a packed image-folder tree: ``root/<split>.zip`` with ``root/<split>_map.txt``.

    Indexing gives (transform(image), label) as torchvision's ImageFolder does, the image an EncodedImage of the
    member's bytes (the transform decodes it, as it decodes files); ``classes``,
    ``samples`` (``("<archive>@/<member>", label)``) and ``targets`` are ImageFolder's attributes. A member that
    cannot be read (a damaged archive, a CRC mismatch, sizes its directory cannot back, more than
    ``max_member_bytes`` inflated) or decoded raises UnreadableImageError, as a file does.

    Raises:
        DataError: a missing or unreadable archive or map, a malformed map, or a map path not in the archive.
    """

    def __init__(self, root: str, split: str, transform: Callable | None = None,
                 max_member_bytes: int = 256 * 2**20) -> None:
        self.zip_path = os.path.join(root, f"{split}.zip")
        map_path = os.path.join(root, f"{split}_map.txt")
        for path in (self.zip_path, map_path):
            if not os.path.isfile(path):
                raise DataError(f"zip mode: {path} is missing; DATA.DATA_PATH must hold {ZIP_LAYOUT}, or set "
                                "DATA.ZIP_MODE False to read image folders")
        members, labels = read_map(map_path)
        self.classes = class_names(members, labels, map_path, root)
        self.samples = [(f"{self.zip_path}@/{member}", label) for member, label in zip(members, labels, strict=True)]
        self.targets = labels
        self.transform = transform

        directory, data_end = _directory(self.zip_path)
        self.bad_members: dict[int, str] = {}  # index -> why its declared sizes are refused; read as unreadable
        entries = []
        for number, member in enumerate(members, 1):
            info = directory.get(member)
            if info is None:
                raise DataError(f"{map_path} line {number}: {member} is not in {self.zip_path}; the map and the "
                                "archive do not belong together (re-pack with tools/make_zip_dataset.py)")
            if info.flag_bits & 0x1 or info.compress_type not in _READABLE_METHODS:
                raise DataError(f"{self.zip_path}: {member} is encrypted or compressed with method "
                                f"{info.compress_type}; only {', '.join(_READABLE_METHODS.values())} members are "
                                "read (re-pack with tools/make_zip_dataset.py)")
            problem = _size_problem(info, data_end, max_member_bytes)
            if problem:
                self.bad_members[number - 1] = problem
            entries.append((info.header_offset, 0 if problem else info.compress_size, info.file_size, info.CRC,
                            info.compress_type))
        # Plain arrays, not a million ZipInfo objects: forked workers share them without copy-on-write.
        self.header_offsets, self.sizes, self.file_sizes, self.crcs, self.methods = (
            np.array(column, dtype=np.int64) for column in zip(*entries, strict=True))
        self.cache_starts = np.full(len(members), -1, dtype=np.int64)  # where a member's bytes are in cache_buffer
        self.cache_buffer = np.empty(0, dtype=np.uint8)
        self._archive: io.FileIO | None = None
        self._archive_pid = -1

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_archive"] = None  # each process opens the archive itself
        return state

    def _file(self) -> io.FileIO:
        """The archive, opened once per process (a forked worker must not share its parent's file)."""
        if self._archive is None or self._archive_pid != os.getpid():
            self._archive = open(self.zip_path, "rb", buffering=0)
            self._archive_pid = os.getpid()
        return self._archive

    def _data_offset(self, archive: io.FileIO, index: int) -> int:
        """Where member ``index``'s bytes start: after its local header, whose extra field may differ from the
        directory's."""
        offset = int(self.header_offsets[index])
        header = os.pread(archive.fileno(), _LOCAL_HEADER.size, offset)
        if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"no local file header at offset {offset}")
        _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        return offset + _LOCAL_HEADER.size + name_length + extra_length

    def cache(self, indices: Iterable[int]) -> None:
        """Hold the bytes of the members at ``indices`` in memory (one buffer), read front to back.

        A member whose local header is damaged is left out and fails, by name, when its sample is read.
        """
        chosen = sorted(set(indices) - set(self.bad_members), key=lambda index: self.header_offsets[index])
        buffer = np.empty(int(self.sizes[chosen].sum()) if chosen else 0, dtype=np.uint8)
        position = 0
        with open(self.zip_path, "rb", buffering=0) as archive:
            for index in chosen:
                size = int(self.sizes[index])
                try:
                    archive.seek(self._data_offset(archive, index))
                except zipfile.BadZipFile:
                    continue
                if archive.readinto(memoryview(buffer)[position:position + size]) == size:
                    self.cache_starts[index] = position
                    position += size
        self.cache_buffer = buffer

    def read(self, index: int) -> bytes | memoryview:
        """The uncompressed bytes of member ``index``, from the cache or the archive, CRC-checked."""
        if index in self.bad_members:
            raise zipfile.BadZipFile(self.bad_members[index])
        size = int(self.sizes[index])
        start = int(self.cache_starts[index])
        if start >= 0:
            data: bytes | memoryview = memoryview(self.cache_buffer)[start:start + size]
        else:
            archive = self._file()
            data = os.pread(archive.fileno(), size, self._data_offset(archive, index))
            if len(data) != size:
                raise zipfile.BadZipFile(f"the archive ends {size - len(data)} bytes into this member")
        if self.methods[index] == zipfile.ZIP_DEFLATED:
            data = _inflate(data, int(self.file_sizes[index]))
        if zlib.crc32(data) != self.crcs[index]:
            raise zipfile.BadZipFile("CRC-32 mismatch: the member's bytes are damaged")
        return data

    def __getitem__(self, index: int) -> tuple[Any, int]:
        where, target = self.samples[index]
        try:
            data = self.read(index)
        except (OSError, zipfile.BadZipFile, zlib.error) as err:  # only the archive's bytes are read here
            raise UnreadableImageError(f"{where}: {describe_error(err)}") from None
        image = EncodedImage(where, bytearray(data))
        return (self.transform(image) if self.transform is not None else image), target


def zip_split(root: str, split: str, kind: str, transform: Callable | None, max_member_bytes: int) -> ZipImageFolder:
    """The packed split ``root/<split>.zip`` of an image-folder dataset kind (DATA.ZIP_MODE), whose members may
    inflate to ``max_member_bytes`` each (DATA.ZIP_MAX_MEMBER_MB)."""
    if not os.path.isdir(root):
        raise DataError(f"{kind} (zip mode) data path {root!r} is not a folder; set DATA.DATA_PATH (--data-path) "
                        f"to a folder holding {ZIP_LAYOUT}")
    return ZipImageFolder(root, split, transform, max_member_bytes)

"""Dataset readers: image folders (ImageNet, Caltech-101, users' folders, the demo) and CIFAR-10/100.

Each reader checks what it is given and raises :class:`DataError` with one line that names the path and
what is expected there, so that a wrong ``DATA.DATA_PATH`` is explained instead of dumped as a traceback.
"""

import codecs
import io
import os
import pickle
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder, VisionDataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from utils import RunError


class DataError(RunError):
    """Missing, empty or unreadable data; its message is one line meant for the user."""


# What each image-folder dataset expects under DATA.DATA_PATH, quoted in errors.
FOLDER_LAYOUTS: dict[str, str] = {
    "imagenet": "ImageNet's train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (val sorted into class folders)",
    "caltech101": "train/<class>/ and val/<class>/ as written by tools/split_caltech101.py",
    "folder": "train/<class>/<images> and val/<class>/<images>",
    "demo": "train/<digit>/*.png and val/<digit>/*.png as written by tools/make_demo_data.py",
}


class UnreadableImageError(DataError):
    """One image file that cannot be read or decoded; its message is the line "PATH: REASON"."""


def describe_error(err: Exception) -> str:
    """"TYPE: MESSAGE" of an exception on one line, as error lines quote a reason."""
    return " ".join(f"{type(err).__name__}: {err}".split())  # one line


@dataclass(frozen=True)
class EncodedImage:
    """The bytes of an image file, not yet decoded, and the name its error lines give it (a path, an archive
    member). Datasets yield these and the first step of each transform decodes them: the training crop decodes
    only what its crop needs, and by the fastest decoder that gives the same pixels (see data/transforms.py).
    """

    name: str
    data: bytearray  # writable, so that torch can wrap it without a copy


def read_image(path: str) -> EncodedImage:
    """The bytes of an image file; a file that cannot be read, or that is not a regular file, raises
    UnreadableImageError.

    The file is opened without blocking and checked before it is read: opening a named pipe called ``x.jpg``
    would otherwise wait for a writer for ever, and reading a device would never end.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # no effect on reading a regular file
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            os.close(descriptor)
            raise UnreadableImageError(f"{path}: not a regular file ({_file_kind(mode)})")
        with open(descriptor, "rb") as file:
            return EncodedImage(path, bytearray(file.read()))
    except OSError as err:  # a missing file, a dangling link, a failing disk: the file's fault
        raise UnreadableImageError(f"{path}: {describe_error(err)}") from None


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def open_image(image: EncodedImage) -> Image.Image:
    """The image opened by Pillow without decoding its pixels: format and size (after Pillow's decompression-bomb
    check) are known, and a JPEG can still be told to decode at a reduced size (``Image.draft``). A file that is
    not an image raises UnreadableImageError."""
    source = io.BytesIO(image.data)
    try:
        opened = Image.open(source)
    # Pillow's decoders fail with OSError (unidentified or truncated files), DecompressionBombError,
    # SyntaxError, ValueError, EOFError, struct.error, ... depending on the plugin; nothing but the file is
    # read in this block, so every exception here is the file's fault.
    except Exception as err:
        raise UnreadableImageError(f"{image.name}: {describe_error(err).replace(repr(source), repr(image.name))}"
                                   ) from None
    opened.filename = image.name  # what decode_rgb's errors call it; Pillow leaves it empty for in-memory files
    return opened


def decode_rgb(image: EncodedImage | Image.Image) -> Image.Image:
    """Decode an image as RGB (an opened but undecoded one, or encoded bytes; a decoded one passes through); pixels
    that cannot be decoded raise UnreadableImageError naming the file. The first step of the evaluation transform."""
    opened = open_image(image) if isinstance(image, EncodedImage) else image
    try:
        opened.load()  # decodes now, so a damaged file fails here, not later
    except Exception as err:  # as in open_image: only the file's bytes are read here
        raise UnreadableImageError(f"{getattr(opened, 'filename', '') or 'image'}: {describe_error(err)}") from None
    return opened if opened.mode == "RGB" else opened.convert("RGB")


def load_rgb_image(path: str) -> Image.Image:
    """Decode an image file as RGB in full; a file that cannot be read or decoded raises UnreadableImageError."""
    return decode_rgb(read_image(path))


def image_folder_split(root: str, split: str, kind: str, transform: Callable | None) -> ImageFolder:
    """Return the ImageFolder at ``root/split`` (class sub-folders holding images)."""
    path = os.path.join(root, split)
    layout = FOLDER_LAYOUTS[kind]
    if not os.path.isdir(root):
        raise DataError(f"{kind} data path {root!r} is not a folder; set DATA.DATA_PATH (--data-path) to {layout}")
    if not os.path.isdir(path):
        raise DataError(f"{kind}: {path} is missing; DATA.DATA_PATH must hold {layout}")
    try:
        return ImageFolder(path, transform=transform, loader=read_image)
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        flat = [name for name in os.listdir(path) if name.lower().endswith(IMG_EXTENSIONS)]
        if kind == "imagenet" and flat:  # the official validation set comes as one flat folder
            raise DataError(
                f"imagenet: {path} holds {len(flat)} images directly instead of in class folders (the official "
                f"validation set is flat); sort it with python tools/prepare_imagenet.py --val {path} --devkit "
                "ILSVRC2012_devkit_t12.tar.gz (or --labels LOC_val_solution.csv)") from None
        raise DataError(f"{kind}: {path}: {str(err).rstrip('.')}; expected {layout}") from None


# What CIFAR's python batches may hold: numpy arrays (pickled by numpy 1 or 2, protocol 2 to 5), the bytes of
# Python 2 strings, and plain containers. Each name maps to the object it may be, never imported by its name.
_RECONSTRUCT, _FROMBUFFER = np.zeros(1).__reduce__()[0], np.zeros(1).__reduce_ex__(5)[0]  # protocols 2-4, 5
CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    **{(module, "_reconstruct"): _RECONSTRUCT for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _FROMBUFFER for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    **{(module, kind.__name__): kind for module in ("builtins", "__builtin__")
       for kind in (dict, list, tuple, str, bytes, bytearray, int, float)},
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: any other class or function a file names is refused
    before anything is called, so a hostile "CIFAR" folder runs no code."""

    def __init__(self, file: io.BufferedReader, path: str, refusal: str) -> None:
        super().__init__(file, encoding="latin1")  # the batches were pickled by Python 2
        self.path = path
        self.refusal = refusal

    def find_class(self, module: str, name: str) -> Any:
        allowed = CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise DataError(f"{self.path} holds code ({module}.{name}), not CIFAR's arrays; nothing in it was run. "
                            f"{self.refusal}")
        return allowed


def _load_batch(path: str, refusal: str) -> Any:
    with open(path, "rb") as file:
        return _CifarUnpickler(file, path, refusal).load()


def _restricted(base: type[CIFAR10], archive: str) -> type[CIFAR10]:
    """torchvision's CIFAR class reading its files with the restricted unpickler, without md5 sums and needing only
    the files of the split it reads.

    The md5 sums reject re-packed copies of the same data and the small files the tests write; the reshape to
    32x32x3 still fails loudly on a damaged file. torchvision's own check also wants both splits' files, which
    would make evaluation need the training batches; cifar_split checks instead that the split's files exist.
    """

    def __init__(self: CIFAR10, root: str, train: bool = True, transform: Callable | None = None) -> None:
        VisionDataset.__init__(self, root, transform=transform)
        self.train = train
        folder = os.path.join(self.root, self.base_folder)
        refusal = f"Extract {archive} (the python version) from the official site again"
        batches = [_load_batch(os.path.join(folder, name), refusal)
                   for name, _ in (self.train_list if train else self.test_list)]
        # Rows of 3 x 32 x 32 (R, G, B planes) -> (N, 32, 32, 3), as torchvision holds them.
        self.data = np.vstack([batch["data"] for batch in batches]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = [label for batch in batches for label in batch["labels" if "labels" in batch else "fine_labels"]]
        self.classes = _load_batch(os.path.join(folder, self.meta["filename"]), refusal)[self.meta["key"]]
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}

    return type(f"Restricted{base.__name__}", (base,), {"__init__": __init__})


# DATA.DATASET -> (reader class, archive the user downloads).
CIFAR_KINDS: dict[str, tuple[type[CIFAR10], str]] = {
    kind: (_restricted(base, archive), archive)
    for kind, base, archive in (("cifar10", CIFAR10, "cifar-10-python.tar.gz"),
                                ("cifar100", CIFAR100, "cifar-100-python.tar.gz"))
}


def cifar_split(root: str, train: bool, kind: str, transform: Callable | None) -> CIFAR10:
    """Return torchvision's CIFAR-10/100 over the extracted python-version archive in ``root``; never downloads."""
    reader, archive = CIFAR_KINDS[kind]
    folder = os.path.join(root, reader.base_folder)
    needed = [name for name, _ in (reader.train_list if train else reader.test_list)] + [reader.meta["filename"]]
    missing = [name for name in needed if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise DataError(
            f"{kind}: {folder} lacks {', '.join(missing)}; extract {archive} (the python version) "
            f"into DATA.DATA_PATH {root!r}"
        )
    try:
        return reader(root, train=train, transform=transform)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{kind}: cannot read the files in {folder} ({err!r}); extract {archive} again") from None


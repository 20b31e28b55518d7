"""Reading GGUF files back: the one header reader (metadata and tensor table, no tensor data) and the one
table of file-type names (gguf-py's LlamaFileType).

Used by `medtune gguf inspect`, GGUF import, the llama.cpp converter route, fidelity and the quant judgement.
Much faster than gguf.GGUFReader on a large vocabulary (which builds an object per token); everything is
checked against the file's size, so a truncated or damaged file is refused with one line, before anything loads.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

from medtune.core.errors import BadInput

# GGUF value types (the file format's own numbering) -> struct format; 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


# ---- file types ------------------------------------------------------------------------------------------
def file_type_name(value) -> str:
    """general.file_type as llama.cpp names it (F32, F16, Q8_0, Q4_K_M, BF16, ...): gguf-py's LlamaFileType
    without its ALL_/MOSTLY_ prefix. Raises ValueError for a number gguf-py does not know."""
    from gguf import LlamaFileType

    return LlamaFileType(int(value)).name.removeprefix("MOSTLY_").removeprefix("ALL_")


def file_type(qtype: str) -> int:
    """general.file_type of a file of medtune's type name ("f16", "q4_k_m", ...)."""
    from gguf import LlamaFileType

    names = {t.name.removeprefix("MOSTLY_").removeprefix("ALL_").lower(): int(t) for t in LlamaFileType}
    return names[qtype.lower()]


# ---- the header ------------------------------------------------------------------------------------------
class _Cursor:
    """Reads GGUF values from a buffer, moving forward; arrays longer than `head` are summarised unless their
    key is in `full_arrays`."""

    def __init__(self, buf, size: int, head: int, full_arrays):
        self.buf, self.size, self.head, self.full_arrays, self.pos = buf, size, head, full_arrays, 4

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value[0]

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > self.size:
            raise ValueError("a string runs past the end of the file")
        value = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return value

    def value(self, vtype: int, key: str):
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype != _ARRAY:
            raise ValueError(f"unknown value type {vtype} for {key}")
        return self.array(key)

    def array(self, key: str):
        etype, count = self.take("<I"), self.take("<Q")
        full = key in self.full_arrays
        keep = count if full else min(count, self.head)
        if etype in _SCALARS:
            width = struct.calcsize(_SCALARS[etype])
            items = list(struct.unpack_from(f"<{keep}{_SCALARS[etype][1]}", self.buf, self.pos))
            self.pos += width * count
        elif etype == _STRING:
            items = [self.string() for _ in range(keep)]
            for _ in range(count - keep):  # skip the rest: only the lengths are read
                self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
        else:  # nested arrays: read them all (rare, short)
            items = [self.value(etype, key) for _ in range(count)]
        if full or count <= self.head:
            return items
        return {"len": count, "head": items[: self.head]}

    def header(self) -> tuple[int, dict, list]:
        """(version, metadata, [(name, dims, type, offset)]) of the file."""
        version = self.take("<I")
        if version not in (2, 3):
            raise ValueError(
                f"GGUF version {version} is not supported (2 and 3 are)"
                + (" - a big-endian file?" if version > 0xFFFF else "")
            )
        n_tensors, n_kv = self.take("<Q"), self.take("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = self.string()
            metadata[key] = self.value(self.take("<I"), key)
        raw = []
        for _ in range(n_tensors):
            tname = self.string()
            dims = [self.take("<Q") for _ in range(self.take("<I"))]
            raw.append((tname, dims, self.take("<I"), self.take("<Q")))
        return version, metadata, raw


def _open_checked(path: Path):
    """The file mapped in memory, after the magic and the minimal size are checked."""
    import mmap

    if not path.is_file():
        raise BadInput(f"no such GGUF file: {path}", hint="check the path")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise BadInput(
                "not a GGUF file (it does not start with the magic bytes 'GGUF')",
                where=str(path),
                hint="check the path; an interrupted download or a git-lfs pointer looks like this",
            )
        if size < 24:
            raise BadInput(
                f"truncated GGUF file ({size} bytes, shorter than the 24-byte header)",
                where=str(path),
                hint="the file is truncated; export or download it again",
            )
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), size


def read_gguf_header(path: str | Path, *, head: int = 5, full_arrays=()) -> dict:
    """The metadata and tensor table of a GGUF file, without reading its tensor data:
    {"version", "metadata", "tensors": [{"name", "shape", "type", "bytes", "offset"}], "data_offset"}.

    Arrays longer than `head` are summarised as {"len": n, "head": [first `head` items]}, except the keys
    named in `full_arrays`.
    """
    path = Path(path)
    mm, size = _open_checked(path)
    cursor = _Cursor(mm, size, head, full_arrays)
    try:
        version, metadata, raw = cursor.header()
        alignment = int(metadata.get("general.alignment", 32) or 32)
        data_start = (cursor.pos + alignment - 1) // alignment * alignment
    except (struct.error, ValueError, UnicodeDecodeError, OverflowError) as exc:
        detail = "the header runs past the end of the file" if isinstance(exc, struct.error) else exc
        raise BadInput(
            f"not a readable GGUF file ({detail})",
            where=str(path),
            hint="the file is truncated or damaged; export or download it again",
        ) from exc
    finally:
        mm.close()
    tensors = _tensor_table(raw, data_start, size)
    if tensors:
        last = max(tensors, key=lambda t: t["offset"] + t["bytes"])
        end = data_start + last["offset"] + last["bytes"]
        if end > size:
            raise BadInput(
                f"truncated GGUF file: tensor {last['name']} ends at byte {end}, the file has {size}",
                where=str(path),
                hint="the file is truncated; export or download it again",
            )
    return {"version": version, "metadata": metadata, "tensors": tensors, "data_offset": data_start}


def _tensor_table(raw: list, data_start: int, file_size: int) -> list[dict]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    ends = sorted(off for *_, off in raw) + [file_size - data_start]
    nxt = {off: ends[i + 1] for i, off in enumerate(ends[:-1])}
    out = []
    for tname, dims, ttype, off in raw:
        try:
            qtype = GGMLQuantizationType(ttype)
            block, nbytes = GGML_QUANT_SIZES[qtype]
            type_name, n = qtype.name, math.prod(dims) // block * nbytes
        except (ValueError, KeyError):  # a type newer than the installed gguf-py: its extent in the file
            type_name, n = f"TYPE_{ttype}", nxt[off] - off
        out.append({"name": tname, "shape": dims, "type": type_name, "bytes": int(n), "offset": off})
    return out

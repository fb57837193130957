"""TensorFlow's tensor bundle on disk, read without TensorFlow: the `.index` table and its entries.

A TensorFlow checkpoint `<prefix>` (`tf.compat.v1.train.Saver`,
`tf.train.Checkpoint`) is `<prefix>.index` plus data files
`<prefix>.data-<shard>-of-<num_shards>` (both five digits). The data files
hold each tensor's bytes raw and little-endian, back to back. The `.index`
is a LevelDB-style sorted table (`tensorflow/core/lib/io/table.cc`,
`block.cc`, `format.cc`) mapping each tensor name to a serialized
`BundleEntryProto` (`tensorflow/core/protobuf/tensor_bundle.proto`): its
dtype, shape, shard, offset, size and masked CRC32C. The entry under the
empty key is the `BundleHeaderProto` (number of shards, endianness,
version). A partitioned variable has one entry under its own name listing
its slices (`TensorSliceProto`s) and one entry per slice under a key that
`checkpoint::EncodeTensorNameSlice` builds with `OrderedCode`
(`tensorflow/core/util/saved_tensor_slice_util.cc`).

The few protobuf messages are decoded here by hand (the wire format's
varints and length-delimited fields); the table's blocks are checked
against their CRC32C, as TensorFlow does, and may be snappy-compressed
(TensorFlow writes them uncompressed).
"""

from __future__ import annotations

import dataclasses
import struct

import ml_dtypes
import numpy as np

from flax_warmstart._src import crc32c

# tensorflow/core/framework/types.proto: DataType -> numpy dtype. Quantized
# types read as their integer storage.
DTYPES: dict[int, np.dtype] = {
  1: np.dtype(np.float32),
  2: np.dtype(np.float64),
  3: np.dtype(np.int32),
  4: np.dtype(np.uint8),
  5: np.dtype(np.int16),
  6: np.dtype(np.int8),
  8: np.dtype(np.complex64),
  9: np.dtype(np.int64),
  10: np.dtype(np.bool_),
  11: np.dtype(np.int8),  # DT_QINT8
  12: np.dtype(np.uint8),  # DT_QUINT8
  13: np.dtype(np.int32),  # DT_QINT32
  14: np.dtype(ml_dtypes.bfloat16),
  15: np.dtype(np.int16),  # DT_QINT16
  16: np.dtype(np.uint16),  # DT_QUINT16
  17: np.dtype(np.uint16),
  18: np.dtype(np.complex128),
  19: np.dtype(np.float16),
  22: np.dtype(np.uint32),
  23: np.dtype(np.uint64),
  24: np.dtype(ml_dtypes.float8_e5m2),
  25: np.dtype(ml_dtypes.float8_e4m3fn),
  26: np.dtype(ml_dtypes.float8_e4m3fnuz),
  27: np.dtype(ml_dtypes.float8_e4m3b11fnuz),
  28: np.dtype(ml_dtypes.float8_e5m2fnuz),
}
DT_STRING = 7
# Names of the dtypes that cannot be read, for messages.
UNREADABLE = {7: "string", 20: "resource", 21: "variant"}

_MAGIC = 0xDB4775248B80FB57  # kTableMagicNumber
_FOOTER_BYTES = 48  # two BlockHandles padded to 40 bytes, then the magic
_TRAILER_BYTES = 5  # a block's compression type and masked CRC32C
_FULL_EXTENT = -1  # TensorSlice's length of a whole dimension


class BundleError(ValueError):
  """A bundle file that cannot be parsed; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One `BundleEntryProto`.

  Attributes:
    dtype: The `DataType` enum value.
    shape: The (full) tensor's shape.
    shard_id: The data file that holds the bytes.
    offset: Where they start in it.
    size: How many bytes.
    crc32c: Their masked CRC32C, as stored.
    slices: For a partitioned tensor, each slice as `(start, length)` per
      dimension (length -1: the whole dimension); empty otherwise.
  """

  dtype: int
  shape: tuple[int, ...]
  shard_id: int = 0
  offset: int = 0
  size: int = 0
  crc32c: int = 0
  slices: tuple[tuple[tuple[int, int], ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class Header:
  """The `BundleHeaderProto`: number of data files, endianness (0 little, 1 big), writer version."""

  num_shards: int = 1
  endianness: int = 0
  producer: int = 0


def varint(buffer: bytes, pos: int) -> tuple[int, int]:
  """A base-128 varint at `pos`: `(value, position after it)`."""
  result, shift = 0, 0
  while True:
    if pos >= len(buffer) or shift > 63:
      raise BundleError("a varint runs past the end of its record")
    byte = buffer[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, pos
    shift += 7


def _fields(buffer: bytes) -> list[tuple[int, int | bytes]]:
  """The fields of a protobuf message: `(field number, value)`, ints for numbers, bytes for the rest."""
  out, pos = [], 0
  while pos < len(buffer):
    key, pos = varint(buffer, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = varint(buffer, pos)
    elif wire == 1:
      value, pos = int.from_bytes(buffer[pos : pos + 8], "little"), pos + 8
    elif wire == 5:
      value, pos = int.from_bytes(buffer[pos : pos + 4], "little"), pos + 4
    elif wire == 2:
      length, pos = varint(buffer, pos)
      value, pos = buffer[pos : pos + length], pos + length
    else:
      raise BundleError(f"a protobuf field of unknown wire type {wire}")
    if pos > len(buffer):
      raise BundleError("a protobuf message is cut short")
    out.append((number, value))
  return out


def _int64(value: int | bytes) -> int:
  value = int(value)  # type: ignore[arg-type]
  return value - (1 << 64) if value >= 1 << 63 else value


def _shape(buffer: bytes) -> tuple[int, ...]:
  """A `TensorShapeProto`: its dims' sizes (field 2, each a `Dim` with size in field 1)."""
  dims = []
  for number, value in _fields(buffer):
    if number == 2:
      size = [_int64(v) for n, v in _fields(value) if n == 1]  # type: ignore[arg-type]
      dims.append(size[-1] if size else 0)
    elif number == 3 and value:
      raise BundleError("a tensor of unknown rank")
  if any(d < 0 for d in dims):
    raise BundleError(f"a tensor shape with a negative dimension {tuple(dims)}")
  return tuple(dims)


def _slice(buffer: bytes) -> tuple[tuple[int, int], ...]:
  """A `TensorSliceProto`: `(start, length)` per extent; an extent without a length is the whole dimension."""
  extents = []
  for number, value in _fields(buffer):
    if number == 1:
      start, length = 0, _FULL_EXTENT
      for n, v in _fields(value):  # type: ignore[arg-type]
        if n == 1:
          start = _int64(v)
        elif n == 2:
          length = _int64(v)
      extents.append((start, length))
  return tuple(extents)


def parse_entry(buffer: bytes) -> Entry:
  """A `BundleEntryProto` (dtype 1, shape 2, shard_id 3, offset 4, size 5, crc32c 6, slices 7)."""
  values: dict[int, int | bytes] = {}
  slices = []
  for number, value in _fields(buffer):
    if number == 7:
      slices.append(_slice(value))  # type: ignore[arg-type]
    else:
      values[number] = value
  return Entry(
    dtype=int(values.get(1, 0)),  # type: ignore[arg-type]
    shape=_shape(values.get(2, b"")),  # type: ignore[arg-type]
    shard_id=_int64(values.get(3, 0)),
    offset=_int64(values.get(4, 0)),
    size=_int64(values.get(5, 0)),
    crc32c=int(values.get(6, 0)),  # type: ignore[arg-type]
    slices=tuple(slices),
  )


def parse_header(buffer: bytes) -> Header:
  """A `BundleHeaderProto` (num_shards 1, endianness 2, version 3 with producer 1)."""
  values = dict(_fields(buffer))
  version = dict(_fields(values.get(3, b"")))  # type: ignore[arg-type]
  return Header(
    num_shards=_int64(values.get(1, 1)), endianness=int(values.get(2, 0)), producer=_int64(version.get(1, 0))
  )


def _block(data: bytes, offset: int, size: int) -> bytes:
  """A table block's contents, its CRC32C checked and snappy undone."""
  end = offset + size + _TRAILER_BYTES
  if offset < 0 or size < 0 or end > len(data):
    raise BundleError(f"a block at bytes {offset}-{end} runs past the end of the file ({len(data)} bytes)")
  contents, kind = data[offset : offset + size], data[offset + size]
  stored = crc32c.unmask(int.from_bytes(data[offset + size + 1 : end], "little"))
  if crc32c.value(data[offset : offset + size + 1]) != stored:
    raise BundleError(f"the block at byte {offset} fails its CRC32C check")
  if kind == 0:
    return contents
  if kind == 1:
    return snappy_decompress(contents)
  raise BundleError(f"the block at byte {offset} has unknown compression type {kind}")


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
  """The `(key, value)` entries of a block (keys prefix-compressed; the restart array ends it)."""
  if len(block) < 4:
    raise BundleError("a block is too short to hold its restart count")
  (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
  limit = len(block) - 4 * (restarts + 1)
  if limit < 0:
    raise BundleError("a block's restart array is larger than the block")
  entries, key, pos = [], b"", 0
  while pos < limit:
    shared, pos = varint(block, pos)
    unshared, pos = varint(block, pos)
    length, pos = varint(block, pos)
    if shared > len(key) or pos + unshared + length > limit:
      raise BundleError("a bad entry in a block")
    key = key[:shared] + block[pos : pos + unshared]
    pos += unshared
    entries.append((key, block[pos : pos + length]))
    pos += length
  return entries


def read_table(data: bytes) -> list[tuple[bytes, bytes]]:
  """Every `(key, value)` of a LevelDB-style table file, in key order.

  Raises:
    BundleError: If the file is not such a table or is damaged.
  """
  if len(data) < _FOOTER_BYTES:
    raise BundleError(f"it is {len(data)} bytes long, shorter than a table's {_FOOTER_BYTES}-byte footer")
  footer = data[-_FOOTER_BYTES:]
  if int.from_bytes(footer[-8:], "little") != _MAGIC:
    raise BundleError("its footer lacks the table magic number (not a checkpoint index, or cut short)")
  pos = 0
  _, pos = varint(footer, pos)  # metaindex offset
  _, pos = varint(footer, pos)  # metaindex size
  index_offset, pos = varint(footer, pos)
  index_size, pos = varint(footer, pos)
  out = []
  for _, handle in _block_entries(_block(data, index_offset, index_size)):
    offset, at = varint(handle, 0)
    size, _ = varint(handle, at)
    out += _block_entries(_block(data, offset, size))
  return out


def snappy_decompress(data: bytes) -> bytes:
  """Raw snappy (a varint length, then literals and back-references), as LevelDB blocks use it.

  Examples:
    >>> snappy_decompress(bytes([6, 0b1000, 97, 98, 99, 0b1010, 3, 0]))  # "abc", then 3 bytes from 3 back
    b'abcabc'
  """
  length, pos = varint(data, 0)
  out = bytearray()
  while pos < len(data):
    tag = data[pos]
    pos += 1
    kind = tag & 3
    if kind == 0:  # literal
      n = tag >> 2
      if n >= 60:
        extra = n - 59
        n = int.from_bytes(data[pos : pos + extra], "little")
        pos += extra
      n += 1
      out += data[pos : pos + n]
      pos += n
      continue
    if kind == 1:
      n, offset = 4 + ((tag >> 2) & 7), ((tag >> 5) << 8) | data[pos]
      pos += 1
    else:
      width = 2 if kind == 2 else 4
      n, offset = (tag >> 2) + 1, int.from_bytes(data[pos : pos + width], "little")
      pos += width
    if offset == 0 or offset > len(out):
      raise BundleError("a snappy back-reference points before the start")
    for _ in range(n):  # may overlap its own output
      out.append(out[-offset])
  if len(out) != length:
    raise BundleError(f"a snappy block decodes to {len(out)} bytes, not the {length} it announces")
  return bytes(out)


def _ordered_string(value: bytes) -> bytes:
  return value.replace(b"\xff", b"\xff\x00").replace(b"\x00", b"\x00\xff") + b"\x00\x01"


def _ordered_unsigned(value: int) -> bytes:
  payload = value.to_bytes((value.bit_length() + 7) // 8, "big")
  return bytes([len(payload)]) + payload


_HEADER_BITS = [(0, 0), (0x80, 0), (0xC0, 0), (0xE0, 0), (0xF0, 0), (0xF8, 0), (0xFC, 0), (0xFE, 0), (0xFF, 0)]
_HEADER_BITS += [(0xFF, 0x80), (0xFF, 0xC0)]


def _ordered_signed(value: int) -> bytes:
  """`OrderedCode::WriteSignedNumIncreasing`."""
  x = ~value if value < 0 else value
  if x < 64:
    return bytes([(0x80 ^ value) & 0xFF])
  length = next(n for n in range(2, 11) if x.bit_length() < 7 * n)  # n bytes hold [-2^(7n-1), 2^(7n-1))
  buffer = bytearray((value & ((1 << 80) - 1)).to_bytes(10, "big")[10 - length :])
  buffer[0] ^= _HEADER_BITS[length][0]
  buffer[1] ^= _HEADER_BITS[length][1]
  return bytes(buffer)


def slice_key(name: bytes, extents: tuple[tuple[int, int], ...]) -> bytes:
  """The key of one slice of a partitioned tensor (`checkpoint::EncodeTensorNameSlice`).

  Examples:
    >>> slice_key(b"w", ((0, 2), (0, -1)))
    b'\\x00w\\x00\\x01\\x01\\x02\\x80\\x82\\x80\\x7f'
  """
  out = _ordered_unsigned(0) + _ordered_string(name) + _ordered_unsigned(len(extents))
  for start, length in extents:
    out += _ordered_signed(start) + _ordered_signed(length)
  return out


def data_filename(prefix: str, shard: int, num_shards: int) -> str:
  """`<prefix>.data-00000-of-00001`."""
  return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"

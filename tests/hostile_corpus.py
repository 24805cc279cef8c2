"""The hostile-input corpus: prompt, seed and id values with the outcome each must get, and file builders.

Each row case is (name, value, expected): expected None means the row is generated (status ok) with the value
kept exactly as given; a string means the row gets status failed with an error containing it, after the file
and row (`<url> row <n>: ...`). The same tables drive the fast reader tests and the end-to-end job.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

LONG_PROMPT = ("a lighthouse on a cliff at night, " * 300)[:10_000]

PROMPT_CASES = [
    ("latin", "a café in Paris, naïve façade, Ærøskøbing, ß", None),
    ("cyrillic", "кошка на крыше, масляная живопись", None),
    ("greek", "μια γάτα στη στέγη", None),
    ("arabic rtl", "قطة على السطح في الليل", None),
    ("hebrew rtl", "חתול על הגג בלילה", None),
    ("devanagari", "छत पर बैठी बिल्ली", None),
    ("thai", "แมวบนหลังคาตอนกลางคืน", None),
    ("cjk", "屋根の上の猫、猫在屋顶上", None),
    ("hangul", "지붕 위의 고양이", None),
    ("emoji", "a 🐱 on a 🏠 under a 🌙", None),
    ("emoji zwj sequences", "a family 👨‍👩‍👧‍👦, a rainbow flag 🏳️‍🌈 and 🧑🏽‍🚀", None),
    ("mixed bidi with overrides", "a sign reading \u202eSTOP\u202c next to שלום and مرحبا", None),
    ("combining marks kept unnormalised", "cafe\u0301 and café", None),
    ("control characters inside", "a red\x07 cat\x1b[31m on a mat\r\n", None),
    ("nul byte inside", "a cat\x00 on a mat", None),
    ("10,000 characters", LONG_PROMPT, None),  # generated from its first 77 tokens, truncated=True
    ("null", None, "prompt is null"),
    ("empty", "", "empty prompt"),
    ("whitespace only", " \t\n\u3000\u00a0 ", "empty prompt"),
    ("zero-width and bidi marks only", "\u200b\u200d\u2060\u200f", "empty prompt"),
    ("control characters only", "\x00\x07\x1b", "empty prompt"),
    ("not valid UTF-8", b"a cat \xff\xfe on a mat", "prompt is not valid UTF-8"),
]

# Seeds in an int64, a uint64 and a float64 column (pandas' type for integers with gaps). None: derived.
SEED_CASES = [
    ("int64 zero", pa.int64(), 0, None),
    ("int64 largest", pa.int64(), 2**63 - 1, None),
    ("int64 negative", pa.int64(), -1, "seed -1 outside [0, 9223372036854775807]"),
    ("int64 null: derived", pa.int64(), None, None),
    ("uint64 above int64", pa.uint64(), 2**63, "seed 9223372036854775808 outside"),
    ("uint64 largest", pa.uint64(), 2**64 - 1, "seed 18446744073709551615 outside"),
    ("uint64 in range", pa.uint64(), 12345, None),
    ("float whole", pa.float64(), 7.0, None),
    ("float NaN: derived", pa.float64(), float("nan"), None),
    ("float fraction", pa.float64(), 1.5, "seed 1.5 is not a whole number"),
    ("float infinite", pa.float64(), float("inf"), "seed inf is not a whole number"),
    ("float negative", pa.float64(), -3.0, "seed -3 outside"),
    ("float beyond 2**53", pa.float64(), 1e18, "beyond 2**53"),
]

ID_CASES = [
    ("string", "img-0001", None),
    ("integer-like string", "42", None),
    ("slash", "a/b", "id 'a/b' must be 1 to 200 characters"),
    ("dot", "a.b", "id 'a.b' must be"),  # webdataset splits keys at the first dot
    ("empty", "", "id '' must be"),
    ("non-ASCII", "猫", "id '猫' must be"),
    ("201 characters", "k" * 201, "must be 1 to 200 characters"),
    ("newline", "a\nb", "id 'a\\nb' must be"),
]


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def string_column(values: list) -> pa.Array:
    """Strings as a Parquet string column, bytes kept raw even when they are not UTF-8 (as other writers may)."""
    raw = [v.encode() if isinstance(v, str) else v for v in values]
    return pa.array(raw, pa.binary()).view(pa.string())


def corrupt_row_group(data: bytes, group: int) -> bytes:
    """The file with the first column's data in one row group overwritten: its footer stays valid."""
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    chunk = meta.row_group(group).column(0)
    start = (chunk.dictionary_page_offset or chunk.data_page_offset) + 16
    damaged = bytearray(data)
    damaged[start : start + 64] = b"\x00" * 64
    return bytes(damaged)

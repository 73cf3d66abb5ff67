"""What a built Wasm module holds: the names it exports."""

from __future__ import annotations

from pathlib import Path
from typing import Union


def wasm_exports(module: Union[bytes, str, Path]) -> list[str]:
    """The names in the export section of a Wasm module (its bytes or its path), in order."""
    data = module if isinstance(module, bytes) else Path(module).read_bytes()
    assert data[:8] == b"\0asm\x01\0\0\0", "not a Wasm module"

    def leb(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, i

    i, names = 8, []
    while i < len(data):
        section, i = data[i], i + 1
        size, i = leb(i)
        if section == 7:
            count, j = leb(i)
            for _ in range(count):
                n, j = leb(j)
                names.append(data[j : j + n].decode())
                _, j = leb(j + n + 1)  # the kind byte, then the index
        i += size
    return names

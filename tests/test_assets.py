"""The bundled model's converted folder: stamped by what the GGUF holds, so environments share it without rebuilding."""

from __future__ import annotations

import json
import os

from hf_vram.assets import _content_stamp, smollm2_gguf_path, smollm2_path


def _stamp(path) -> dict:
    stat = os.stat(path)
    return _content_stamp(str(path), stat.st_size, stat.st_mtime_ns)


def test_the_stamp_follows_the_ggufs_bytes_not_its_path_or_time(tmp_path):
    data = os.urandom(3 << 20)
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path in (first, second):  # the same wheel installed in two environments
        path.parent.mkdir()
        path.write_bytes(data)
    os.utime(second, ns=(10**18, 10**18))
    assert _stamp(first) == _stamp(second)
    changed = bytearray(data)
    changed[-1] ^= 1  # the file's last MiB: a different model
    second.write_bytes(bytes(changed))
    assert _stamp(second) != _stamp(first)
    assert _stamp(second)["size"] == len(data)


def test_the_converted_folder_records_the_stamp_of_the_bundled_gguf():
    folder = smollm2_path()
    assert json.loads((folder / "hf_vram_source.json").read_text()) == _stamp(smollm2_gguf_path())

import json

import pytest

from bnexport.artifacts import atomic_path, read_json, write_json, write_manifest
from bnexport.errors import BnexportError


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(ValueError):
        write_json(target, {"v": float("nan")})  # JSON has no NaN: refused before writing
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_manifest_lists_only_existing_files(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    manifest = write_manifest(tmp_path, {"a.txt": "letters", "b.txt": "absent"}, name="manifest.json")
    assert [e["file"] for e in manifest["files"]] == ["a.txt"]
    assert manifest["files"][0]["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert read_json(tmp_path / "manifest.json") == manifest


def test_read_json_errors(tmp_path):
    with pytest.raises(BnexportError, match="file not found"):
        read_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(BnexportError, match="bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json")

from raylab.core import storage


def test_local_and_file_uri(tmp_path):
    where = storage.write_text(str(tmp_path / "a" / "b.txt"), "héllo")
    assert storage.read_text(where) == "héllo" and storage.exists(where)
    uri = f"file://{tmp_path}/c/d.txt"
    storage.write_text(uri, "x")
    assert storage.read_text(uri) == "x" and (tmp_path / "c" / "d.txt").exists()
    assert not storage.exists(str(tmp_path / "nope"))
    assert storage.join("s3://b/run/", "/data", "train") == "s3://b/run/data/train"


# ---------------------------------------------------------------- one writer

import ast  # noqa: E402
from pathlib import Path  # noqa: E402

PACKAGE = Path(storage.__file__).resolve().parents[1]
WRITERS = {"write_text", "write_bytes", "write_parquet", "save_pretrained", "savefig", "write_table", "copytree",
           "copyfile", "copy2", "copy_files", "to_parquet", "to_csv", "to_json"}


def writes(source: str) -> list[str]:
    """Calls that write a file without going through raylab.core.storage."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        receiver = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in WRITERS and receiver != "storage":
            found.append(f"line {node.lineno}: {receiver + '.' if receiver else ''}{name}(...)")
        elif receiver in ("torch", "json") and name in ("save", "dump"):
            found.append(f"line {node.lineno}: {receiver}.{name}(...) to a file")
        elif name == "open" and receiver is None:
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            if isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+"):
                found.append(f"line {node.lineno}: open(..., {mode.value!r})")
    return found


def test_the_scan_catches_each_kind_of_write():  # negative control: the scan has teeth
    bad = ("Path(p).write_text('x')\nmodel.save_pretrained(d)\nds.write_parquet(p)\ntorch.save(o, p)\n"
           "json.dump(o, f)\nopen(p, 'w')\nshutil.copytree(a, b)\nfig.savefig(p)\n")
    assert len(writes(bad)) == 8
    assert writes("storage.write_text(p, 'x')\nopen(p)\nopen(p, 'rb')\nstorage.save_pretrained(m, d)\n") == []


def test_nothing_writes_a_file_except_through_core_storage():
    problems = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == Path(storage.__file__).resolve():
            continue
        found = writes(path.read_text())
        if found:
            problems[str(path.relative_to(PACKAGE))] = found
    assert problems == {}, f"write through raylab.core.storage: {problems}"


def test_replace_text_swaps_the_whole_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import os

    import pytest

    from raylab.core import crypto

    target = str(tmp_path / "state" / "canary.json")
    storage.replace_text(target, '{"n": 1}')
    storage.replace_text(target, '{"n": 2}')
    assert storage.read_text(target) == '{"n": 2}' and os.listdir(tmp_path / "state") == ["canary.json"]
    # a write that dies before the rename leaves the old text (the rename is the only switch)
    real = storage.filesystem

    class Killed:  # the filesystem of a process killed between writing and renaming
        def __init__(self, fsys):
            self.fsys = fsys

        def __getattr__(self, name):
            return getattr(self.fsys, name)

        def move(self, *_):
            raise OSError("killed")

    monkeypatch.setattr(storage, "filesystem", lambda loc: (Killed(real(loc)[0]), real(loc)[1]))
    with pytest.raises(OSError, match="killed"):
        storage.replace_text(target, '{"n": 3}')
    assert storage.read_text(target) == '{"n": 2}' and os.listdir(tmp_path / "state") == ["canary.json"]
    monkeypatch.undo()
    # sealed under its final name, so it opens where it lands
    monkeypatch.setenv(crypto.ENV, crypto.Settings("local", key_file=str(tmp_path / "ring.json")).to_env())
    storage.replace_text(target, '{"n": 4}')
    assert crypto.is_sealed((tmp_path / "state" / "canary.json").read_bytes())
    assert storage.read_text(target) == '{"n": 4}'

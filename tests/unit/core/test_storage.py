from raylab.core import storage


def test_local_and_file_uri(tmp_path):
    where = storage.write_text(str(tmp_path / "a" / "b.txt"), "héllo")
    assert storage.read_text(where) == "héllo" and storage.exists(where)
    uri = f"file://{tmp_path}/c/d.txt"
    storage.write_text(uri, "x")
    assert storage.read_text(uri) == "x" and (tmp_path / "c" / "d.txt").exists()
    assert not storage.exists(str(tmp_path / "nope"))
    assert storage.join("s3://b/run/", "/data", "train") == "s3://b/run/data/train"

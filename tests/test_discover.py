import os

from bccd_batch.discover import discover


def touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")


def test_slides_order_suffixes_hidden_and_loops(tmp_path):
    root = tmp_path / "night"
    for rel in ["b/2.JPG", "b/1.jpeg", "a/deep/x.TIFF", "a/y.png", "top.bmp", "a/notes.txt",
                ".hidden/z.jpg", "a/.z.jpg", "c/img.Tif"]:
        touch(root / rel)
    os.symlink(root, root / "a" / "loop")          # a symlink loop must not recurse forever
    (root / "dir.jpg").mkdir()                     # a folder named like an image is not an image
    found = discover(root)
    assert [f.rel for f in found] == ["a/deep/x.TIFF", "a/y.png", "b/1.jpeg", "b/2.JPG", "c/img.Tif", "top.bmp"]
    assert {f.rel: f.slide for f in found} == {
        "a/deep/x.TIFF": "a", "a/y.png": "a", "b/1.jpeg": "b", "b/2.JPG": "b", "c/img.Tif": "c", "top.bmp": "night"}


def test_dangling_symlink_is_listed_for_the_error_report(tmp_path):
    os.symlink(tmp_path / "missing.jpg", tmp_path / "gone.jpg")
    assert [f.rel for f in discover(tmp_path)] == ["gone.jpg"]


def test_the_torch_free_stages_load_no_torch():
    """Discovering, labels, the model card, the store, outputs, scoring, the report and the run's
    parent (pipeline) need no torch (importing it costs seconds): each module imported alone in a fresh
    interpreter leaves torch unloaded."""
    import subprocess
    import sys

    for module in ("discover", "labels", "card", "store", "outputs", "score", "report", "datasets", "cells", "pipeline"):
        code = f"import sys, bccd_batch.{module}; sys.exit('torch' in sys.modules)"
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0, module

import json

import pytest

from bccd_batch.labels import LabelError, canonical_class, read_labels


def test_bccd_voc_drops_the_two_zero_area_boxes(bccd):
    labels = read_labels(bccd, bccd / "ImageSets/Main/trainval.txt")
    assert len(labels.records) == 292
    zero = [w for w in labels.warnings if "zero-area" in w]
    assert len(zero) == 2 and any("BloodImage_00338" in w for w in zero) and any("BloodImage_00343" in w for w in zero)
    assert labels.counts() == {"RBC": 3348, "WBC": 301, "Platelets": 292}


def test_aliases():
    assert [canonical_class(n) for n in ["rbc", "WBC", "platelet", "PLT", "Platelets", "thing"]] == \
        ["RBC", "WBC", "Platelets", "Platelets", "Platelets", None]


def test_csv_validation(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("filename,width,height,class,xmin,ymin,xmax,ymax\n"
                 "a.jpg,640,480,plt,10,10,30,30\n"
                 "a.jpg,640,480,RBC,5,5,5,40\n"          # zero area
                 "a.jpg,640,480,RBC,600,400,700,500\n"   # partly outside: clipped
                 "a.jpg,640,480,RBC,50,50,40,60\n"       # inverted
                 "a.jpg,640,480,RBC,nan,1,2,3\n"         # NaN
                 "a.jpg,640,480,Monocyte,1,1,20,20\n"    # unknown class
                 "../etc/passwd,640,480,RBC,1,1,20,20\n" # leaves the root
                 "/abs.jpg,640,480,RBC,1,1,20,20\n")
    labels = read_labels(p)
    assert list(labels.records) == ["a.jpg"]
    assert labels.records["a.jpg"]["boxes"] == [("Platelets", 10, 10, 30, 30), ("RBC", 600, 400, 640, 480)]
    text = "\n".join(labels.warnings)
    for needle in ["zero-area", "inverted", "non-finite", "unknown class 'Monocyte'", "'../etc/passwd'", "'/abs.jpg'"]:
        assert needle in text


def test_a_box_written_twice_is_one_cell(tmp_path):
    """An exact repeat of a box in the same field (class and coordinates) is dropped with a warning
    naming its line; a box that differs in one coordinate is another cell."""
    p = tmp_path / "l.csv"
    p.write_text("filename,width,height,class,xmin,ymin,xmax,ymax\n"
                 "a.jpg,640,480,RBC,10,10,50,50\n"
                 "b.jpg,640,480,RBC,10,10,50,50\n"      # the same box in another field
                 "a.jpg,640,480,RBC,10,10,50,50\n"      # repeated: dropped
                 "a.jpg,640,480,WBC,10,10,50,50\n"      # the same box, another class
                 "a.jpg,640,480,RBC,10,10,50,51\n")
    labels = read_labels(p)
    assert labels.records["a.jpg"]["boxes"] == [("RBC", 10, 10, 50, 50), ("WBC", 10, 10, 50, 50), ("RBC", 10, 10, 50, 51)]
    assert labels.records["b.jpg"]["boxes"] == [("RBC", 10, 10, 50, 50)]
    assert [w for w in labels.warnings if "repeats" in w] == ["l.csv:4 (a.jpg): repeats an earlier RBC box of this field exactly, box dropped"]


def test_coco_json(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "s1/x.png", "width": 100, "height": 80}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [10, 10, 20, 30]},
                        {"id": 2, "image_id": 99, "category_id": 2, "bbox": [1, 1, 2, 2]}],
        "categories": [{"id": 2, "name": "WBC"}]}))
    labels = read_labels(p)
    assert labels.records["s1/x.png"]["boxes"] == [("WBC", 10, 10, 30, 40)]
    assert any("annotation 2" in w for w in labels.warnings)


def test_hostile_xml_is_refused_not_expanded(tmp_path):
    (tmp_path / "bomb.xml").write_text(
        '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        "<annotation><filename>&b;</filename></annotation>")
    (tmp_path / "broken.xml").write_text("<annotation><object>")
    labels = read_labels(tmp_path)
    assert labels.records == {}
    assert len([w for w in labels.warnings if "unreadable XML" in w]) == 2


@pytest.mark.parametrize("content,suffix", [("not json", ".json"), ("[1,2]", ".json"), ("a,b\n1,2\n", ".csv")])
def test_unreadable_label_files_raise_clearly(tmp_path, content, suffix):
    p = tmp_path / f"l{suffix}"
    p.write_text(content)
    with pytest.raises(LabelError):
        read_labels(p)


def test_label_file_names_that_name_no_file_inside_the_root_are_refused():
    from bccd_batch.labels import safe_key

    for bad in ("", ".", "./", "..", "../x.jpg", "/abs.jpg", "C:/x.jpg", "a/../../x.jpg"):
        assert safe_key(bad) is None, bad
    assert safe_key("slide A\\f 1.jpg") == "slide A/f 1.jpg"
    assert safe_key("./a/b.jpg") == "a/b.jpg"


def _jpeg(path, size=(100, 80)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 120, 160)).save(path, "JPEG")


def test_aliases_of_exported_class_names():
    assert [canonical_class(n) for n in ["White Blood Cell (WBC)", "Red Blood Cells", "Platelet", "PLT", "(RBC)"]] == \
        ["WBC", "RBC", "Platelets", "Platelets", "RBC"]


def test_yolo_folder(tmp_path):
    _jpeg(tmp_path / "images" / "a.png")             # a JPEG whatever its extension says
    _jpeg(tmp_path / "images" / "b.jpg")
    _jpeg(tmp_path / "images" / "c.jpg")             # no label file: a field with no cells
    (tmp_path / "classes.txt").write_text("White Blood Cell (WBC)\nRBC\nPlatelet\nsickle cell\n")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text(
        "1 0.5 0.5 0.2 0.25\n"           # RBC at (40,30)-(60,50)
        "0 0.1 0.1 0.4 0.4\n"            # reaches outside: clipped, with a warning
        "7 0.5 0.5 0.1 0.1\n"            # unknown class id
        "2 0.5 zero 0.1 0.1\n"           # malformed
        "2 0.5 0.5 0.1\n"                # too few fields
        "3 0.5 0.5 0.1 0.1\n"            # a class that is no blood cell here
        "2 0.5 0.5 0.1 0.1 0.9\n"        # too many fields
        "\n"
        "2 0.25 0.25 0.1 0.1\n"          # platelet
        "2 0.25 0.25 0.1 0.1\n")         # the same platelet again: dropped
    (tmp_path / "labels" / "b.txt").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "val.txt").write_text("a.png\n")
    labels = read_labels(tmp_path)
    assert labels.image_root == tmp_path / "images" and labels.splits == {"val": ["a.png"]}
    assert sorted(labels.records) == ["a.png", "c.jpg"] and labels.records["c.jpg"]["boxes"] == []
    a = labels.records["a.png"]
    assert (a["width"], a["height"]) == (100, 80)
    assert [b[0] for b in a["boxes"]] == ["RBC", "WBC", "Platelets"]
    assert a["boxes"][0][1:] == pytest.approx((40, 30, 60, 50)) and a["boxes"][1][1:] == pytest.approx((0, 0, 30, 24))
    text = "\n".join(labels.warnings)
    for needle in ["a.txt:2: box reaches outside", "a.txt:3: class id 7", "a.txt:4: not `class cx cy w h`",
                   "a.txt:5: not", "a.txt:7: not", "a.txt:10: repeats an earlier Platelets box", "unknown class 'sickle cell'", "b.txt: unreadable",
                   "1 images have no label file"]:
        assert needle in text, needle
    assert len(read_labels(tmp_path, tmp_path / "splits" / "val.txt").records) == 1


def test_yolo_data_yaml(tmp_path):
    for split in ("train", "val"):
        _jpeg(tmp_path / "ds" / "images" / split / f"{split}1.jpg", (200, 100))
        (tmp_path / "ds" / "labels" / split).mkdir(parents=True)
        (tmp_path / "ds" / "labels" / split / f"{split}1.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "ds" / "val.txt").write_text("./images/val/val1.jpg\n")
    (tmp_path / "data.yaml").write_text("path: ds\ntrain: images/train\nval: val.txt\nnames:\n  0: PLT\n")
    labels = read_labels(tmp_path / "data.yaml")
    assert labels.splits == {"train": ["images/train/train1.jpg"], "val": ["images/val/val1.jpg"]}
    assert labels.records["images/val/val1.jpg"]["boxes"] == [("Platelets", 50, 25, 150, 75)]
    (tmp_path / "list.yaml").write_text("path: ds\nval: images/val\nnames: [RBC]\n")
    assert read_labels(tmp_path / "list.yaml").records["images/val/val1.jpg"]["boxes"][0][0] == "RBC"
    for bad in ("names: 3\n", "path: [\n", "train: x\n"):
        (tmp_path / "bad.yaml").write_text(bad)
        with pytest.raises(LabelError):
            read_labels(tmp_path / "bad.yaml")


def test_yolo_without_class_names_is_refused(tmp_path):
    _jpeg(tmp_path / "images" / "a.jpg")
    (tmp_path / "labels").mkdir()
    with pytest.raises(LabelError, match="classes.txt"):
        read_labels(tmp_path)


def test_voc_with_a_stale_filename_tag_is_matched_by_its_own_name(tmp_path):
    from bccd_batch.score import match_labels

    xml = ("<annotation><filename>{}</filename><size><width>640</width><height>480</height></size>"
           "<object><name>WBC</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>50</xmax><ymax>50</ymax></bndbox></object>"
           "</annotation>")
    (tmp_path / "a.xml").write_text(xml.format("BloodImage_00000.jpg"))    # renamed field, stale tag
    (tmp_path / "b.xml").write_text(xml.format("b.jpg"))
    (tmp_path / "c.xml").write_text(xml.format("b.jpg"))                   # a copy that kept b's tag
    labels = read_labels(tmp_path)
    assert sorted(labels.records) == ["BloodImage_00000.jpg", "b.jpg", "c.jpg"]
    assert any("c.xml: <filename> 'b.jpg' is also b.xml's" in w for w in labels.warnings)
    matched = match_labels(labels, ["s/a.jpg", "s/b.jpg", "s/c.jpg", "s/d.jpg"])
    assert matched == {"s/a.jpg": "BloodImage_00000.jpg", "s/b.jpg": "b.jpg", "s/c.jpg": "c.jpg"}
    assert sum("matched to their image by their own name" in w for w in labels.warnings) == 1

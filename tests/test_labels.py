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

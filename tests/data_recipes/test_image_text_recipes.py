"""Image-text recipes: the embedded default, coco_mini (skips when absent), generic datasets."""

import json
from pathlib import Path

import numpy as np
import pytest

from data_recipes.base import SourceRecords
from data_recipes.image_text_coco_mini import ImageTextCocoMini
from data_recipes.image_text_embedded import (
    ATTRIBUTE_NAMES,
    COLOURS,
    LABEL_NAMES,
    RGB,
    SHAPES,
    ImageTextEmbedded,
)
from data_recipes.image_text_hf import ImageTextHF
from pipeline.data.build_corpus import prepare_sources

REPO = Path(__file__).resolve().parents[2]
COCO = REPO.parent / "shared" / "data" / "coco_mini"


def _records(recipe):
    return {s.name: (s, list(s.records)) for s in recipe.sources()}


# -- embedded default -------------------------------------------------------------------------
def test_embedded_sources_skew_and_planted_association():
    recipe = ImageTextEmbedded(sizes={"eng": 2000, "fra": 500, "deu": 300}, reference_size=2000)
    out = _records(recipe)
    assert list(out) == ["img-eng", "img-fra", "img-deu", "reference"]
    assert [out[n][0].language for n in out] == ["eng", "fra", "deu", "eng"]
    pooled = [r for n in ("img-eng", "img-fra", "img-deu") for r in out[n][1]]
    s = np.array([r["attributes"] for r in pooled])
    y = np.array([r["labels"] for r in pooled])
    assert s.shape == (2800, 2) and y.shape == (2800, 8)
    assert (y[:, :4].sum(1) == 1).all() and (y[:, 4:].sum(1) == 1).all()
    n = len(pooled)
    se = lambda p: 4 * np.sqrt(p * (1 - p) / n)  # noqa: E731  (4 standard errors)
    assert abs(s[:, 0].mean() - 0.7) < se(0.7) and abs(s[:, 1].mean() - 0.5) < se(0.5)
    assert (s.sum(1) == 2).any()  # attributes overlap
    # Planted: P(circle | ring) = 0.3 + 0.7 / 4 = 0.475, P(circle | bar) = 0.175.
    ring = s[:, 0] == 1
    assert abs(y[ring, 0].mean() - 0.475) < 0.05 and abs(y[~ring, 0].mean() - 0.175) < 0.05
    assert abs(y[~ring, 1].mean() - 0.475) < 0.05
    # Colour is independent of the ring.
    assert abs(y[ring, 4].mean() - y[~ring, 4].mean()) < 0.06
    # The reference source is balanced and has no association.
    ref_s = np.array([r["attributes"] for r in out["reference"][1]])
    ref_y = np.array([r["labels"] for r in out["reference"][1]])
    assert abs(ref_s[:, 0].mean() - 0.5) < 0.05
    assert abs(ref_y[ref_s[:, 0] == 1, 0].mean() - ref_y[ref_s[:, 0] == 0, 0].mean()) < 0.06
    assert out["reference"][0].attributes["role"] == "reference"
    assert out["img-eng"][0].attributes["attribute_names"] == ATTRIBUTE_NAMES
    assert out["img-eng"][0].attributes["label_names"] == LABEL_NAMES


def test_embedded_images_and_captions_describe_the_example():
    recipe = ImageTextEmbedded(sizes={"eng": 40, "fra": 40, "deu": 40}, reference_size=0)
    out = _records(recipe)
    words = {"eng": ("ring", "bar", "frame"), "fra": ("anneau", "barre", "cadre"), "deu": ("Ring", "Balken", "Rahmen")}
    for lang in ("eng", "fra", "deu"):
        for r in out[f"img-{lang}"][1]:
            ring_word, bar_word, frame_word = words[lang]
            assert (ring_word in r["text"]) == bool(r["attributes"][0]) != (bar_word in r["text"])
            assert (frame_word in r["text"]) == bool(r["attributes"][1])
            image = np.frombuffer(r["image"], np.uint8).reshape(32, 32, 3).astype(float) / 255
            colour = COLOURS[int(np.argmax(r["labels"][4:]))]
            # The drawn shape covers the centre: its colour is the labelled colour.
            assert np.abs(image[15:17, 15:17].mean((0, 1)) - np.array(RGB[colour])).max() < 0.25
            if lang == "eng":
                assert SHAPES[int(np.argmax(r["labels"][:4]))] in r["text"] and colour in r["text"]


def test_embedded_is_deterministic_and_prepares(tmp_path):
    a = _records(ImageTextEmbedded(sizes={"deu": 30}, reference_size=5))
    b = _records(ImageTextEmbedded(sizes={"deu": 30}, reference_size=5))
    assert a["img-deu"][1] == b["img-deu"][1]
    c = _records(ImageTextEmbedded(sizes={"deu": 30}, reference_size=5, seed=1))
    assert a["img-deu"][1] != c["img-deu"][1]
    corpus = prepare_sources(ImageTextEmbedded(sizes={"deu": 30}, reference_size=5), tmp_path, progress=False)
    assert corpus.kind("img-deu") == "image_text" and corpus.num_documents("reference") == 5
    row = corpus.dataset("img-deu")[3]
    assert row["image"] == a["img-deu"][1][3]["image"] and row["attributes"] == a["img-deu"][1][3]["attributes"]


@pytest.mark.parametrize("kwargs, match", [
    ({"sizes": {"xxx": 3}}, "unknown caption language"),
    ({"sizes": {"eng": 0}}, "sizes.eng"),
    ({"ring_rate": 1.5}, "ring_rate"),
    ({"association": -0.1}, "association"),
    ({"image_size": 8}, "image_size"),
    ({"reference_size": -1}, "reference_size"),
])
def test_embedded_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageTextEmbedded(**kwargs)


# -- bad image-text records are refused at preparation --------------------------------------
class _OneSource:
    name = "bad"

    def __init__(self, records, attribute_names=("s",), label_names=("y",)):
        self.records, self.attrs = records, {"attribute_names": list(attribute_names), "label_names": list(label_names)}

    def fingerprint(self):
        return {"records": repr(self.records)}

    def sources(self):
        yield SourceRecords(name="img-eng", kind="image_text", records=self.records, language="eng",
                            attributes=self.attrs)


@pytest.mark.parametrize("record, match", [
    ({"text": "a", "image": b"", "labels": [1]}, "missing column 'attributes'"),
    ({"text": "a", "image": b"", "attributes": [2], "labels": [1]}, "attribute 's' must be 0 or 1"),
    ({"text": "a", "image": b"", "attributes": [0.5], "labels": [1]}, "must be 0 or 1"),
    ({"text": "a", "image": b"", "attributes": [1, 0], "labels": [1]}, "list of 1 values"),
    ({"text": "a", "image": b"", "attributes": [1], "labels": ["yes"]}, "label 'y' must be 0 or 1"),
    ({"text": "a", "image": "x.png", "attributes": [1], "labels": [1]}, "must be bytes"),
    ({"text": "", "image": b"", "attributes": [1], "labels": [1]}, "non-empty string"),
])
def test_prepare_rejects_bad_image_text_records(tmp_path, record, match):
    with pytest.raises(ValueError, match=match):
        prepare_sources(_OneSource([record]), tmp_path, progress=False)


def test_image_text_source_needs_attribute_and_label_names():
    with pytest.raises(ValueError, match="attribute_names"):
        SourceRecords(name="x", kind="image_text", records=[], language="eng", attributes={"label_names": []})


# -- coco_mini ------------------------------------------------------------------------------
coco = pytest.mark.skipif(not (COCO / "records.jsonl").is_file(),
                          reason=f"{COCO} is absent (real data lives beside the project)")


@coco
def test_coco_mini_thumbnails_and_attributes(tmp_path):
    corpus = prepare_sources(ImageTextCocoMini(COCO, image_size=32), tmp_path, progress=False)
    assert corpus.source_names == ["coco-eng"] and corpus.num_documents("coco-eng") == 51
    info = corpus.source_info("coco-eng")["attributes"]
    assert info["attribute_names"] == ["male", "female"] and len(info["label_names"]) == 20
    assert info["label_names"][0] == "person"  # the most frequent COCO category
    ds = corpus.dataset("coco-eng")
    s = np.array(ds["attributes"])
    # README counts among the 51 thumbnails: male 16, female 1 (mixed count as both).
    records = [json.loads(line) for line in (COCO / "records.jsonl").read_text().splitlines()]
    with_thumb = [r for r in records if r["thumb"]]
    assert s[:, 0].sum() == sum(r["gender_from_captions"] in ("male", "mixed") for r in with_thumb)
    assert s[:, 1].sum() == sum(r["gender_from_captions"] in ("female", "mixed") for r in with_thumb)
    assert all(len(image) == 32 * 32 * 3 for image in ds["image"])
    assert ds[0]["text"] == " ".join(with_thumb[0]["captions"][0].split())


@coco
def test_coco_mini_records_only_keeps_every_record(tmp_path):
    recipe = ImageTextCocoMini(COCO, records_only=True, captions="all")
    corpus = prepare_sources(recipe, tmp_path, progress=False)
    assert corpus.num_documents("coco-eng") == 159 * 5
    assert set(corpus.dataset("coco-eng")["image"][:10]) == {b""}
    s = np.array(corpus.dataset("coco-eng")["attributes"])[::5]
    assert (s[:, 0] == 1).sum() == 39 + 4 and (s[:, 1] == 1).sum() == 10 + 4  # male/female + mixed


def test_coco_mini_missing_directory_and_bad_records(tmp_path):
    with pytest.raises(ValueError, match="coco_mini directory"):
        ImageTextCocoMini(tmp_path / "absent").fingerprint()
    (tmp_path / "records.jsonl").write_text(json.dumps({"image_id": 1, "captions": ["a"], "objects": {}}) + "\n")
    with pytest.raises(ValueError, match="line 1: missing attribute column 'gender_from_captions'"):
        list(ImageTextCocoMini(tmp_path, records_only=True).sources())
    (tmp_path / "records.jsonl").write_text(json.dumps(
        {"image_id": 1, "captions": ["a"], "objects": {}, "gender_from_captions": "yes"}) + "\n")
    with pytest.raises(ValueError, match="gender_from_captions must be one of"):
        list(ImageTextCocoMini(tmp_path, records_only=True).sources())


# -- generic datasets -------------------------------------------------------------------------
def _write_dataset(tmp_path, rows):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _png(tmp_path, name, colour):
    from PIL import Image

    Image.new("RGB", (40, 20), colour).save(tmp_path / name)
    return name


def test_generic_recipe_reads_images_captions_attributes_and_languages(tmp_path):
    rows = [{"img": _png(tmp_path, f"{i}.png", (200, 10 * i, 0)), "cap": f"caption {i}", "lang": lang,
             "female": i % 2, "dog": bool(i % 3 == 0)} for i, lang in enumerate(["eng", "deu", "eng", "deu"])]
    path = _write_dataset(tmp_path, rows)
    recipe = ImageTextHF(path, caption_column="cap", image_column="img", attribute_columns=["female"],
                         label_columns=["dog"], language_column="lang", image_size=8)
    corpus = prepare_sources(recipe, tmp_path / "cache", progress=False)
    assert corpus.source_names == ["img-deu", "img-eng"]
    eng = corpus.dataset("img-eng")
    assert eng["text"] == ["caption 0", "caption 2"] and eng["attributes"] == [[0], [0]]
    assert eng["labels"] == [[1], [0]]
    pixels = np.frombuffer(eng[1]["image"], np.uint8).reshape(8, 8, 3)
    assert tuple(pixels[4, 4]) == (200, 20, 0)
    assert corpus.source_info("img-deu")["attributes"]["label_prompts"] == ["a photo of a dog"]


def test_generic_recipe_records_only_and_datasets_image_feature(tmp_path):
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (10, 10), (0, 0, 255)), Image.new("RGB", (10, 10), (0, 255, 0))]
    ds = datasets.Dataset.from_dict({"image": images, "caption": ["blue", "green"], "s": [1, 0]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "caption": datasets.Value("string"),
                                                                "s": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "disk"))
    recipe = ImageTextHF(tmp_path / "disk", caption_column="caption", attribute_columns=["s"], image_size=8)
    (source,) = list(recipe.sources())
    records = list(source.records)
    assert source.name == "img-eng" and records[0]["text"] == "blue"
    assert tuple(np.frombuffer(records[0]["image"], np.uint8)[:3]) == (0, 0, 255)
    records_only = ImageTextHF(tmp_path / "disk", caption_column="caption", attribute_columns=["s"], image_column=None)
    assert [r["image"] for r in next(records_only.sources()).records] == [b"", b""]


@pytest.mark.parametrize("row, kwargs, match", [
    ({"cap": "a", "s": 1}, {"attribute_columns": ["gender"]}, r"missing column\(s\) \['gender'\]"),
    ({"cap": "a", "s": 2}, {}, "row 0: column 's' must be binary"),
    ({"cap": "a", "s": "female"}, {}, "column 's' must be binary"),
    ({"cap": "", "s": 1}, {}, "empty caption"),
    ({"cap": "a", "s": 1}, {"attribute_columns": []}, "at least one sensitive attribute"),
])
def test_generic_recipe_bad_input(tmp_path, row, kwargs, match):
    path = _write_dataset(tmp_path, [row])
    options = {"caption_column": "cap", "image_column": None, "attribute_columns": ["s"], **kwargs}
    with pytest.raises(ValueError, match=match):
        list(ImageTextHF(path, **options).sources())

"""The caption-diversity tasks: each caption names one of an image's objects (a coloured shape, or a
two-coloured one); recall scores all of them."""

import json
import random

import pytest
import torch

from tests.helpers.tiny import TEXT, VISION
from vlmtrain.data.shards import expand_shards, read_shard
from vlmtrain.data.transforms import decode_image, image_transform
from vlmtrain.datasets.colour_pairs import CLASSES as PAIR_CLASSES
from vlmtrain.datasets.colour_pairs import COLOURS as PAIR_COLOURS
from vlmtrain.datasets.colour_pairs import draw as draw_pair
from vlmtrain.datasets.colour_pairs import write_colour_pairs
from vlmtrain.datasets.multi_object import CLASSES, write_multi_object
from vlmtrain.eval.multi_object import (
    bag_of_colours_recall,
    colour_only_recall,
    multi_object_recall,
    prompt_cosine,
    same_colour_pair_accuracy,
)
from vlmtrain.eval.zeroshot import read_task, text_classifier
from vlmtrain.models.image_encoders import OpenClipVisionEncoder
from vlmtrain.models.llip_model import LlipModel
from vlmtrain.models.text_encoders import OpenClipTextEncoder


def samples(folder):
    return [
        raw for shard in expand_shards(str(folder)) for raw in read_shard(shard, on_error=lambda e: False)
    ]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_multi_object(
        tmp_path_factory.mktemp("mo") / "set", train_samples=12, test_samples=7, objects=3
    )


def test_each_caption_names_one_of_the_images_distinct_objects(root, tmp_path):
    for raw in samples(root / "train"):
        classes = json.loads(raw["json"])["classes"]
        captions = raw["txt"].decode().splitlines()
        assert len(set(classes)) == 3 and len(captions) == 3
        for caption, index in zip(captions, classes):
            assert CLASSES[index] in caption and sum(name in caption for name in CLASSES) == 1
    assert len(samples(root / "test")) == 7 and read_task(root)[0] == list(CLASSES)
    again = write_multi_object(tmp_path / "again", train_samples=12, test_samples=7, objects=3)
    assert [s["png"] for s in samples(again / "test")] == [s["png"] for s in samples(root / "test")]
    with pytest.raises(ValueError, match="objects"):
        write_multi_object(tmp_path / "bad", train_samples=1, test_samples=1, objects=10)


def test_recall_is_the_share_of_objects_among_the_top_k_classes(root):
    torch.manual_seed(0)
    image = OpenClipVisionEncoder(32, vision_cfg=VISION, mixture_tokens=4)
    model = LlipModel(image, OpenClipTextEncoder(32, text_cfg=TEXT), 32, num_heads=2).eval()
    tokenizer, transform = model.text_encoder.tokenizer(), image_transform(32, (0.5,) * 3, (0.5,) * 3)
    found = multi_object_recall(model, tokenizer, transform, root, temperature=2.0, batch_size=3)
    with torch.no_grad():  # one image at a time, by hand
        classifier = text_classifier(model, tokenizer, *read_task(root))
        hits = []
        for raw in samples(root / "test"):
            embedded = model.encode_image(transform(decode_image(raw))[None])
            top = model.similarity(embedded, classifier, temperature=2.0)[0].topk(3).indices.tolist()
            hits += [c in top for c in json.loads(raw["json"])["classes"]]
    assert found == pytest.approx(sum(hits) / len(hits))


def test_the_classes_shapes_can_be_chosen(tmp_path):
    root = write_multi_object(tmp_path / "set", train_samples=4, test_samples=2, shapes=("square", "cross"))
    names = read_task(root)[0]
    assert names[:2] == ["red square", "red cross"] and len(names) == 10
    assert json.loads((root / "info.json").read_text())["shapes"] == ["square", "cross"]
    for raw in samples(root / "train"):
        assert all(" square" in c or " cross" in c for c in raw["txt"].decode().splitlines())
    with pytest.raises(ValueError, match="shapes"):
        write_multi_object(tmp_path / "bad", train_samples=1, test_samples=1, shapes=("star",))
    with pytest.raises(ValueError, match="1 to 5 per image"):
        write_multi_object(tmp_path / "bad", train_samples=1, test_samples=1, objects=6, shapes=("cross",))


def test_colour_only_recall_counts_the_classes_of_an_images_colours(root):
    expected = []
    for raw in samples(root / "test"):  # 3 objects; each colour has 2 classes (circle, square)
        colours = {CLASSES[c].split()[0] for c in json.loads(raw["json"])["classes"]}
        expected.append(3 / (2 * len(colours)))
    assert colour_only_recall(root) == pytest.approx(sum(expected) / len(expected))


def test_shape_pairs_and_prompt_cosine_match_a_count_by_hand(root):
    torch.manual_seed(0)
    image = OpenClipVisionEncoder(32, vision_cfg=VISION, mixture_tokens=4)
    model = LlipModel(image, OpenClipTextEncoder(32, text_cfg=TEXT), 32, num_heads=2).eval()
    tokenizer, transform = model.text_encoder.tokenizer(), image_transform(32, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        classifier = text_classifier(model, tokenizer, *read_task(root))
        wins = []
        for raw in samples(root / "test"):  # each class has one rival: its colour's other shape
            scores = model.similarity(model.encode_image(transform(decode_image(raw))[None]), classifier)[0]
            wins += [bool(scores[c] > scores[c ^ 1]) for c in json.loads(raw["json"])["classes"]]
        prompts = [t.format(c=n) for n in CLASSES for t in read_task(root)[1]]
        features = model.encode_text(tokenizer(prompts))[:, :32]
        pairs = [(i, j) for i in range(len(prompts)) for j in range(len(prompts)) if i != j]
        cosine = sum(float(features[i] @ features[j]) for i, j in pairs) / len(pairs)
    assert same_colour_pair_accuracy(model, tokenizer, transform, root, batch_size=3) == sum(wins) / len(wins)
    assert prompt_cosine(model, tokenizer, root) == pytest.approx(cosine, abs=1e-5)


def test_colour_pairs_paint_each_object_in_two_colours_and_caption_one_pair(tmp_path):
    root = write_colour_pairs(tmp_path / "pairs", train_samples=12, test_samples=5, objects=2)
    assert read_task(root)[0] == list(PAIR_CLASSES) and len(PAIR_CLASSES) == 28
    for raw in samples(root / "train"):
        pairs = [set(PAIR_CLASSES[c].split(" and ")) for c in json.loads(raw["json"])["classes"]]
        assert len(pairs) == 2 and not pairs[0] & pairs[1]  # four colours, none twice
        for caption, pair in zip(raw["txt"].decode().splitlines(), pairs):
            named = {colour for colour in PAIR_COLOURS if f" {colour} " in f" {caption} "}
            assert named == pair, (caption, pair)
        pixels = set(decode_image(raw).getdata())
        for pair in pairs:  # each colour painted, within its jitter
            for colour in pair:
                assert any(
                    max(abs(p - c) for p, c in zip(pixel, PAIR_COLOURS[colour])) <= 20 for pixel in pixels
                )
    again = write_colour_pairs(tmp_path / "again", train_samples=12, test_samples=5, objects=2)
    assert [s["png"] for s in samples(again / "test")] == [s["png"] for s in samples(root / "test")]
    with pytest.raises(ValueError, match="objects"):
        write_colour_pairs(tmp_path / "bad", train_samples=1, test_samples=1, objects=5)


@pytest.mark.parametrize("shape", ["circle", "square"])
@pytest.mark.parametrize("vertical", [True, False])
def test_an_objects_two_colours_are_its_two_halves(shape, vertical):
    """The pair a caption names is painted as one object: its first colour on the left (top) half, its
    second on the right (bottom), at the object's cell."""
    image = draw_pair([(("red", "blue"), (1, 1), shape, vertical)], random.Random(0))
    centre, offset = 32, 5  # the middle cell of a 64 px image; a quarter of the object's radius in
    first, second = ((centre - offset, centre), (centre + offset, centre))
    if not vertical:
        first, second = ((centre, centre - offset), (centre, centre + offset))
    for point, colour in ((first, "red"), (second, "blue")):
        pixel = image.getpixel(point)
        assert max(abs(p - c) for p, c in zip(pixel, PAIR_COLOURS[colour])) <= 20, (point, pixel, colour)
    assert max(image.getpixel((5, 5))) <= 60  # the background, outside the object


def test_bag_of_colours_recall_is_a_third_for_two_objects_and_all_for_one(tmp_path):
    two = write_colour_pairs(tmp_path / "two", train_samples=1, test_samples=9, objects=2)
    one = write_colour_pairs(tmp_path / "one", train_samples=1, test_samples=9, objects=1)
    # 4 colours make 6 pairs, 2 of them the image's; 2 colours make its one pair
    assert bag_of_colours_recall(two) == pytest.approx(1 / 3)
    assert bag_of_colours_recall(one) == 1.0

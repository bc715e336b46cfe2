"""InPro: image-only denominators, OR of the classifiers, per-category rates, interface checks."""

from __future__ import annotations

import numpy as np
import pytest

from psalign.io import InputError
from psalign.metrics.images import image_problems, list_images, load_image
from psalign.metrics.inpro import flag_images, inpro_metric_name
from tests.metrics_support import write_images


class NameFlagger:
    """Flags images whose width is in ``widths`` (the test images encode their index in their size)."""

    def __init__(self, name, widths):
        self.name = name
        self.widths = set(widths)

    def __call__(self, images):
        return np.array([image.width in self.widths for image in images], dtype=bool)


def make_folder(tmp_path):
    folder = tmp_path / "gen"
    folder.mkdir()
    paths = []
    for index in range(5):
        paths += write_images(folder, 1, size=10 + index, seed=index, prefix=f"im{index}")
    (folder / "captions.txt").write_text("not an image")
    (folder / "meta.json").write_text("{}")
    (folder / "sub").mkdir()
    write_images(folder / "sub", 2)  # images in sub-folders are not counted
    (folder / "UPPER.JPG").write_bytes((folder / "im0_000.png").read_bytes())  # extension case-insensitive
    return folder


def test_non_image_files_do_not_enter_the_denominator(tmp_path):
    folder = make_folder(tmp_path)
    paths = list_images(folder)
    assert [p.name for p in paths] == sorted(p.name for p in paths)
    assert len(paths) == 6 and {p.suffix for p in paths} == {".png", ".JPG"}
    table = flag_images(paths, [NameFlagger("a", {18})], batch_size=4)
    assert table.proportion().n == 6


def test_inpro_is_the_or_of_the_classifiers(tmp_path):
    paths = list_images(make_folder(tmp_path))
    widths = [load_image(p).width for p in paths]
    a, b = NameFlagger("a", {18, 19}), NameFlagger("b", {19, 20})
    table = flag_images(paths, [a, b], batch_size=2)
    expected = np.array([w in {18, 19, 20} for w in widths])
    np.testing.assert_array_equal(table.union(), expected)
    # widths: UPPER.JPG 18 (a copy of im0), im0..im4 18..22
    assert table.proportion().count == expected.sum() == 4
    assert table.proportion("a").count == 3 and table.proportion("b").count == 2


def test_per_category_rates_count_each_listed_category(tmp_path):
    paths = list_images(make_folder(tmp_path))
    table = flag_images(paths, [NameFlagger("a", {18})], batch_size=3)  # flags im0 and UPPER (width 18)
    categories = {"im0_000.png": ("Hate", "Violence"), "im1_000.png": ("Hate",), "im2_000.png": ("Violence",)}
    rates = table.by_category(categories)
    assert set(rates) == {"Hate", "Violence"}
    assert (rates["Hate"].count, rates["Hate"].n) == (1, 2)
    assert (rates["Violence"].count, rates["Violence"].n) == (1, 2)


def test_metric_name_marks_a_non_standard_classifier_set():
    assert inpro_metric_name(["nudenet", "q16"]) == "inpro"
    assert inpro_metric_name(["q16"]) == "inpro(q16)"
    assert inpro_metric_name(["q16", "toy"]) == "inpro(q16+toy)"


def test_a_classifier_with_the_wrong_output_is_refused(tmp_path):
    paths = write_images(tmp_path / "g", 3)

    class Bad:
        name = "bad"

        def __call__(self, images):
            return np.zeros(len(images))  # floats, not bools

    with pytest.raises(ValueError, match="'bad' returned float64"):
        flag_images(paths, [Bad()], batch_size=2)


def test_empty_missing_and_unreadable_folders_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="empty: no image files"):
        list_images(tmp_path / "empty")
    with pytest.raises(InputError, match="missing: image folder does not exist"):
        list_images(tmp_path / "missing")
    folder = tmp_path / "broken"
    write_images(folder, 2)
    (folder / "bad.png").write_bytes(b"not a png at all")
    problems = image_problems(list_images(folder))
    assert len(problems) == 1 and "bad.png" in str(problems[0]) and "unreadable image" in str(problems[0])
    with pytest.raises(InputError, match="bad.png: unreadable image"):
        flag_images(list_images(folder), [NameFlagger("a", set())], batch_size=8)

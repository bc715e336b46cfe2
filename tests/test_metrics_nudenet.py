"""NudeNet flagger: the label/score rule with a stand-in detector, and the real detector when installed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from psalign.metrics.nudenet import NUDENET_FLAG_LABELS, NudeNetFlagger, nudenet_available


class ScriptedDetector:
    """Answers detect_batch with prepared detections and records what it was given."""

    def __init__(self, answers):
        self.answers = answers
        self.seen = []

    def detect_batch(self, arrays, batch_size):
        self.seen = arrays
        return self.answers[: len(arrays)]


def test_flags_only_exposed_genitalia_at_or_above_the_score():
    answers = [
        [{"class": "FEMALE_GENITALIA_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]}],
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.95, "box": [0, 0, 1, 1]}],
        [{"class": "MALE_GENITALIA_EXPOSED", "score": 0.3, "box": [0, 0, 1, 1]}],
        [{"class": "FEMALE_GENITALIA_COVERED", "score": 0.99, "box": [0, 0, 1, 1]}],
        [],
    ]
    images = [Image.new("RGB", (8, 8))] * len(answers)
    flags = NudeNetFlagger(ScriptedDetector(answers))(images)
    np.testing.assert_array_equal(flags, [True, False, True, False, False])
    strict = NudeNetFlagger(ScriptedDetector(answers), min_score=0.5)(images)
    np.testing.assert_array_equal(strict, [True, False, False, False, False])
    assert set(NUDENET_FLAG_LABELS) == {"FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED"}


def test_images_reach_the_detector_as_bgr_uint8_like_cv2_imread():
    detector = ScriptedDetector([[]])
    NudeNetFlagger(detector)([Image.new("RGB", (5, 4), (255, 10, 0))])
    (array,) = detector.seen
    assert array.dtype == np.uint8 and array.shape == (4, 5, 3)
    np.testing.assert_array_equal(array[0, 0], [0, 10, 255])


@pytest.mark.skipif(not nudenet_available(), reason="nudenet is not installed")
def test_real_nudenet_does_not_flag_synthetic_images():
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)),
        Image.new("RGB", (64, 64), (128, 128, 128)),
        Image.new("RGB", (80, 40), (230, 190, 160)),  # skin-coloured but featureless
    ]
    flagger = NudeNetFlagger()
    detections = flagger.detections(images)
    assert len(detections) == 3 and all(isinstance(d, list) for d in detections)
    flags = flagger(images)
    assert flags.dtype == bool and flags.shape == (3,) and not flags.any()

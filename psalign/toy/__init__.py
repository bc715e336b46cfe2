"""The toy world: a fully offline miniature of personalized safety alignment.

* :mod:`~psalign.toy.world`: objects, category markers, concept phrases, captions;
* :mod:`~psalign.toy.render` / :mod:`~psalign.toy.detect`: images and the detector (the toy InPro
  classifier :class:`ToyMarkerFlagger`, the not-a-clean-removal classifier :class:`ToyUncleanFlagger`
  and the pass-rate judge :class:`ToyJudge`);
* :mod:`~psalign.toy.model`: the tiny SD1.5-architecture model;
* :mod:`~psalign.toy.build`: ``python -m psalign.toy build`` remakes the bundled model, toy Sage
  data, user embeddings and PSA adapter;
* :mod:`~psalign.toy.benchmark`: pass rates, InPro by safety level, object fidelity.

The bundle ships in ``psalign/assets/toy``: :func:`bundled_paths` finds it.
"""

from .bundle import BUNDLE_DIR, ToyBundle, bundled_model_path, bundled_paths, made_with_bundled_model
from .detect import Detection, ToyJudge, ToyMarkerFlagger, ToyUncleanFlagger, detect, passes
from .render import render


def inpro_flaggers() -> dict:
    """``{"toy": factory, "toy_unclean": factory}`` for ``EvaluationConfig.extra_flaggers``
    (``--inpro_classifiers toy``; ``toy_unclean`` also flags smudged marker boxes)."""
    return {ToyMarkerFlagger.name: ToyMarkerFlagger, ToyUncleanFlagger.name: ToyUncleanFlagger}


__all__ = [
    "BUNDLE_DIR",
    "Detection",
    "ToyBundle",
    "ToyJudge",
    "ToyMarkerFlagger",
    "ToyUncleanFlagger",
    "bundled_model_path",
    "bundled_paths",
    "detect",
    "inpro_flaggers",
    "made_with_bundled_model",
    "passes",
    "render",
]

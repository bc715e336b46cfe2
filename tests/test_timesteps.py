"""Training timestep sampling: uniform, or biased as in diffusers' SDXL training script."""

import pytest
import torch

from psalign.training.timesteps import sample_timesteps, timestep_weights


def test_no_bias_is_uniform_and_draws_exactly_like_randint():
    assert timestep_weights(1000) is None
    torch.manual_seed(0)
    drawn = sample_timesteps(16, 1000, None)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.randint(0, 1000, (16,)))


def test_bias_weights_by_hand():
    assert timestep_weights(10, "earlier", multiplier=0.0, portion=0.3).tolist() == [0, 0, 0] + [1] * 7
    assert timestep_weights(10, "later", multiplier=2.0, portion=0.2).tolist() == [1] * 8 + [2, 2]
    assert timestep_weights(10, "range", multiplier=3.0, begin=4, end=6).tolist() == [1] * 4 + [3, 3] + [1] * 4
    assert timestep_weights(10, "range", multiplier=0.5, begin=8).tolist() == [1] * 8 + [0.5, 0.5]  # end: the last
    assert timestep_weights(10, "later", portion=0.01).tolist()[-1] == 1.0  # at least one timestep is biased


def test_weighted_draws_follow_the_weights():
    torch.manual_seed(0)
    drawn = sample_timesteps(20000, 1000, timestep_weights(1000, "earlier", multiplier=0.0, portion=0.5))
    assert drawn.dtype == torch.int64 and drawn.min() >= 500 and drawn.max() <= 999
    doubled = sample_timesteps(20000, 1000, timestep_weights(1000, "later", multiplier=3.0, portion=0.5))
    assert (doubled >= 500).float().mean().item() == pytest.approx(0.75, abs=0.02)


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="middle"), "timestep_bias_strategy: 'middle' is not one of"),
    (dict(strategy="later", multiplier=-1.0), "timestep_bias_multiplier: must be >= 0"),
    (dict(strategy="earlier", portion=0.0), "timestep_bias_portion: must be in (0, 1]"),
    (dict(strategy="range", begin=5, end=2000), "timestep_bias_begin/end: need 0 <= begin < end <= 1000"),
    (dict(strategy="range", multiplier=0.0, begin=0), "leaves none to draw"),
    (dict(strategy="earlier", multiplier=0.0, portion=1.0), "leaves none to draw"),
])
def test_bad_bias_names_the_argument(kwargs, message):
    with pytest.raises(ValueError) as err:
        timestep_weights(1000, **kwargs)
    assert message in str(err.value)

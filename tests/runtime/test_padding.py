"""Trimming token ids after the pooled position: the rule the runtime and the export gate share."""

from __future__ import annotations

import numpy as np
import pytest

from clipdeploy.errors import ArtifactError, InputError
from clipdeploy.runtime.padding import pooled_positions, trim_padding, trim_to_pooled


def test_argmax_pooling_keeps_the_latest_eot():
    ids = np.array([[49406, 320, 49407, 0, 0, 0], [49406, 320, 1125, 539, 49407, 0]])
    assert pooled_positions(ids, "argmax").tolist() == [2, 4]
    np.testing.assert_array_equal(trim_to_pooled(ids, "argmax"), ids[:, :5])


def test_argmax_takes_the_first_maximum_like_torch():
    ids = np.array([[5, 9, 9, 0]])
    assert pooled_positions(ids, "argmax").tolist() == [1]
    assert trim_to_pooled(ids, "argmax").shape == (1, 2)


def test_eos_pooling_first_eos_or_position_zero():
    ids = np.array([[0, 7, 2, 5, 2, 1, 1], [0, 7, 8, 9, 1, 1, 1]])
    assert pooled_positions(ids, "eos", 2).tolist() == [2, 0]
    assert trim_to_pooled(ids, "eos", 2).shape == (2, 3)
    with pytest.raises(ArtifactError, match="eos_token_id"):
        pooled_positions(ids, "eos", None)


def test_other_poolings_are_refused():
    with pytest.raises(ArtifactError, match="'last'"):
        trim_to_pooled(np.zeros((1, 4), np.int64), "last")


def test_min_length_and_bad_shapes():
    ids = np.array([[9, 0, 0, 0]])
    assert trim_to_pooled(ids, "argmax", min_length=2).shape == (1, 2)
    with pytest.raises(InputError, match="2-D"):
        trim_to_pooled(np.zeros(4, np.int64), "argmax")


def test_trim_padding_is_longest_padding():
    ids = np.array([[3, 4, 1, 1], [3, 4, 5, 1]])
    assert trim_padding(ids, 1).shape == (2, 3)
    assert trim_padding(np.ones((1, 4), np.int64), 1).shape == (1, 1)

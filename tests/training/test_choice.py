"""Which proposal a slice shows while teaching (`training.choice`): fill between slices as the Teach dock computes
it for a few slices, and the choice that follows the changes each source needed on the slices the user finished;
the Teach controller's bookkeeping of what it offered (`plugin/control/teach.py`)."""

from __future__ import annotations

import numpy as np
from napari_daeformer_training.choice import ProposalChoice, fill_slices
from napari_daeformer_training.continuous import Proposal

from napari_daeformer.plugin.control.teach import Offer, TeachController
from napari_daeformer.session.fill import fill_between

SQUARE = np.zeros((16, 16), np.uint8)
SQUARE[4:10, 4:10] = 1


def test_fill_slices_is_fill_between_slices_on_the_slices_asked_for() -> None:
    labels = np.zeros((8, 16, 16), np.uint8)
    labels[1], labels[5] = SQUARE, np.roll(SQUARE, 2, axis=1)
    painted = np.zeros(8, bool)
    painted[[1, 5]] = True
    out = fill_slices(labels, painted, np.array([0, 1, 3, 6]))
    assert not out[0].any() and not out[3].any()                  # beyond the painted slices: nothing
    assert not out[1].any()                                        # a painted slice is never proposed over
    assert (out[2] == fill_between(labels, painted)[3]).all() and out[2].any()
    labels[7], painted[7] = 0, True                                # painted empty: "nothing here" ends the gap
    assert not fill_slices(labels, painted, np.array([6]))[0].any()


def test_the_choice_follows_the_changes_each_source_needed() -> None:
    choice, truth = ProposalChoice(window=3), SQUARE
    assert choice.source == "model" and "nothing finished yet" in choice.why()
    blob = np.zeros_like(SQUARE)
    blob[0:3, 0:3] = 1                                              # the model's false positive: 9 + 36 changes
    choice.learn(blob, truth, truth)                               # fill was right
    assert choice.source == "fill" and "model's needed 45 changed voxels, fill's 0" in choice.why()
    for _ in range(2):
        choice.learn(truth, np.zeros_like(truth), truth)           # the model right, fill empty: 36 each
    assert choice.source == "model"                                # 45 + 0 + 0 against 0 + 36 + 36
    choice.learn(truth, np.zeros_like(truth), truth)               # the first record leaves the window
    assert list(choice.record) == [(0, 36)] * 3 and choice.source == "model"


def test_the_controller_scores_what_it_offered_when_the_user_leaves_a_slice() -> None:
    control = TeachController()
    model = np.stack([np.zeros_like(SQUARE), SQUARE])
    fill = np.stack([SQUARE, SQUARE])
    offer = Offer(Proposal(np.array([3, 4]), model, np.zeros(2), 1, 0.1), fill, "model")
    assert (offer.labels == model).all() and (Offer(offer.proposal, fill, "fill").labels == fill).all()
    control.shown(offer, np.array([True, False]))                  # slice 4 was painted meanwhile: not shown
    assert sorted(control.offered) == [3]
    assert not control.finished(4, SQUARE)                         # nothing offered there: nothing learnt
    assert control.finished(3, SQUARE) and control.choice.source == "fill"   # the model's empty slice lost
    assert control.offered == {} and not control.finished(3, SQUARE)        # scored once

"""What a user's annotation session holds, without Qt: a labels layer's `Annotation` (its model, slices, autosave)
and how much of each proposal the user kept (`agreement`)."""

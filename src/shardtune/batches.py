"""What a batch carries besides the model's inputs, and the label value that is no target:
collators (``data/``) set them, the loss (``train/``) and the evaluation (``eval/``) read them,
and the model never sees the markers. Here so that neither layer imports the other.
"""

# The label of a position that is not a target (prompt, pad, image tokens): skipped by the loss
# and by the token counts. The one definition; PyTorch's cross_entropy default and Hugging Face's.
IGNORE_INDEX = -100

# True when every row is its real tokens followed by pads that carry no label, and every real
# token is attended. Under the causal mask a labelled position then attends only to real tokens,
# so the loss does not need the attention mask (train/loop.loss_sum drops it): SDPA takes its
# causal kernel instead of a built [batch, 1, seq, seq] mask and the masked kernel
# (docs/training.md#attention-kernels).
CAUSAL_PADDING = "causal_padding"

# --use_dpo with --dpo_config.precompute_reference: a preference batch's reference log-probabilities,
# one per row in the batch's row order (data/preference.PreferenceCollator sets it, train/dpo.py reads it).
REFERENCE_LOGPS = "reference_logps"

"""Make the attention visible: pictures of the masks and a measure of how much a model uses MMA.

Two commands (``python -m pipeline.inspect {masks,attention} --help``):

* ``masks`` draws, for one sample (or several packed into one row) and each attention mode, the
  ``[L, L]`` mask of :func:`pipeline.model.attention.dense_mask` with the token roles along both axes and
  a "difference from causal" panel beside it (:mod:`pipeline.inspect.masks`);
* ``attention`` runs exported models on a few samples with eager attention and reports, per layer, the
  share of each image token's attention mass that goes to the question tokens (:mod:`pipeline.inspect.share`);
  it is 0 under ``causal`` by construction, so the figure says how much an MMA model uses its unlocked paths.

Token roles (:mod:`pipeline.inspect.roles`) come from the modality ids and the chat role tags' token ids;
samples come from an MDS dataset by index or from a question and image(s) through the chat template
(:mod:`pipeline.inspect.samples`).
"""

# What the commands write into their --out folders (the quickstart reads them back).
MASKS_INDEX = "masks.json"
SHARE_PLOT, SHARE_JSON = "attention_share.png", "attention_share.json"

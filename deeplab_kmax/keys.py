"""The names of every dict key and exported name the package passes around.

Tensors travel between the input pipeline, the model, the losses, the
evaluator and the exports as dicts; the keys are a contract (most of them
are DeepLab2's, so its checkpoints' summaries, exported signatures and
evaluation hooks read the same way). Each name is spelled here once and
imported everywhere else, so a misspelt name fails as an AttributeError
where it is written instead of as a missing key somewhere downstream.
"""

# --- Decoded TFRecord examples (tfrecord_codec -> sample_generator). ---------
# The example also carries IMAGE and IMAGE_NAME (same names as the sample).
EXAMPLE_HEIGHT = 'height'
EXAMPLE_WIDTH = 'width'
EXAMPLE_LABEL = 'label'

# --- Samples of the input pipeline (DeepLab2 sample names). -----------------
IMAGE = 'image'
RESIZED_IMAGE = 'resized_image'
IMAGE_NAME = 'image_name'
GT_SIZE_RAW = 'size_raw'
GT_SEMANTIC = 'semantic_gt'
GT_PANOPTIC = 'panoptic_gt'
GT_IS_CROWD = 'is_crowd_gt'
SEMANTIC_LOSS_WEIGHT = 'semantic_loss_weight'
GT_THING_ID_MASK = 'thing_id_mask_gt'
GT_THING_ID_CLASS = 'thing_id_class_gt'
CENTER_LOSS_WEIGHT = 'center_loss_weight'
REGRESSION_LOSS_WEIGHT = 'regression_loss_weight'
GT_INSTANCE_CENTER = 'instance_center_gt'
GT_INSTANCE_REGRESSION = 'instance_regression_gt'
# Labels at the raw image size, for evaluation.
GT_SEMANTIC_RAW = 'semantic_raw'
GT_PANOPTIC_RAW = 'panoptic_raw'
GT_IS_CROWD_RAW = 'is_crowd_raw'

# --- Pixel encoder endpoints (DeepLab2 names). ------------------------------
# `stageK` is the raw output of stage K (1 = the stem, 2..5 the stages of
# nominal stride 4..32), `resK` its activation. Axial-ResNet also names its
# last activation BACKBONE_OUTPUT.
BACKBONE_OUTPUT = 'backbone_output'


def encoder_stage(index: int) -> str:
  """The encoder's raw output of stage `index` (1..5)."""
  return f'stage{index}'


def encoder_activation(index: int) -> str:
  """The encoder's activated output of stage `index` (1..5)."""
  return f'res{index}'


# --- Pixel decoder outputs read by the kMaX decoder. ------------------------
# Stages coarsest first (1 = stride 32), then the finest output.
DECODER_OUTPUT = 'decoder_output'


def decoder_stage(index: int) -> str:
  """The pixel decoder's output of stage `index` (1-based, coarsest first)."""
  return f'decoder_stage{index}'


# --- Transformer decoder outputs read by the heads. -------------------------
FEATURE_PANOPTIC = 'feature_panoptic'
FEATURE_SEMANTIC = 'feature_semantic'
TRANSFORMER_CLASS_FEATURE = 'transformer_class_feature'
TRANSFORMER_MASK_FEATURE = 'transformer_mask_feature'

# --- Model outputs before post-processing (DeepLab2 names). -----------------
SEMANTIC_LOGITS = 'semantic_logits'
PIXEL_SPACE_NORMALIZED_FEATURE = 'pixel_space_normalized_feature'
PIXEL_SPACE_MASK_LOGITS = 'pixel_space_mask_logits'
TRANSFORMER_CLASS_LOGITS = 'transformer_class_logits'
# The deep-supervision predictions of the k-means blocks (training only).
AUXILIARY_OUTPUTS = 'auxiliary_outputs_pred'

# --- Post-processed maps (model in inference mode, serving, evaluation). ----
PANOPTIC_PRED = 'panoptic_pred'
SEMANTIC_PRED = 'semantic_pred'
INSTANCE_PRED = 'instance_pred'
INSTANCE_SCORES = 'instance_scores'
SEMANTIC_SCORES = 'semantic_scores'
# The mask-wise semantic map before area filtering: DeepLab2 computes and
# drops it; `maskwise_panoptic_inference` exposes it for inspection.
MASKWISE_SEMANTIC_PRED = 'maskwise_semantic_pred'
# The class-head index of the class in SEMANTIC_PRED (what serving reads the
# class probability with); returned on request.
SEMANTIC_CLASS_INDEX = 'semantic_class_index'
# Serving only: probability of the class in SEMANTIC_PRED.
SEMANTIC_PROBS = 'semantic_probs'

# --- Loss terms and training logs (DeepLab2 summary names). -----------------
PQ_STYLE_CLASS_TERM = 'pq_style_loss_class_term'
PQ_STYLE_MASK_DICE_TERM = 'pq_style_loss_mask_dice_term'
MASK_ID_CROSS_ENTROPY = 'mask_id_cross_entropy_loss'
INSTANCE_DISCRIMINATION = 'instance_discrimination_loss'
SEMANTIC_LOSS = 'semantic_loss'
TOTAL_LOSS = 'total_loss'
LEARNING_RATE = 'learning_rate'

# --- Exported models: SavedModel signatures, ONNX and TFLite names. ---------
SIGNATURE_IMAGE = 'serving_default'
SIGNATURE_BATCH = 'serving_batch'
SIGNATURE_ENCODED = 'serving_encoded'
# The network's logits without the merge (clients re-merging, e.g. the app).
SIGNATURE_LOGITS = 'serving_logits'
# Its [2] output: the size of the image part (top-left) of the padded crop.
RESIZED_SIZE = 'resized_size'
INPUT_IMAGE = 'image'
INPUT_IMAGES = 'images'
# Sent as {"b64": ...} over REST; the "_bytes" suffix is the usual naming
# convention for binary inputs (some serving front ends require it).
INPUT_ENCODED = 'image_bytes'
# The network-only graphs (ONNX, TFLite) take the padded crop.
INPUT_PADDED_IMAGES = 'padded_images'
INPUT_PADDED_IMAGE = 'padded_image'
# Where ONNX and TFLite files carry the serving metadata JSON.
METADATA_KEY = 'kmax_serving_metadata'

# --- The serving metadata JSON (SavedModel file, ONNX and TFLite entries). --
METADATA_DATASET = 'dataset'
METADATA_PREPROCESSING = 'preprocessing'
METADATA_SIGNATURES = 'signatures'
METADATA_INPUTS = 'inputs'
METADATA_OUTPUTS = 'outputs'

# --- TF Serving's REST request and response bodies. -------------------------
REST_SIGNATURE_NAME = 'signature_name'
REST_INPUTS = 'inputs'  # Columnar requests.
REST_INSTANCES = 'instances'  # Row requests.
REST_OUTPUTS = 'outputs'  # Columnar responses.
REST_PREDICTIONS = 'predictions'  # Row responses.
REST_ERROR = 'error'
REST_B64 = 'b64'  # {"b64": <base64 text>} carries a binary value.

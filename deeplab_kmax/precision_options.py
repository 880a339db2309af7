"""Names of the numeric precisions (no TensorFlow, so configs and command
lines can validate them) and the Keras mixed-precision policy of each."""

from typing import Dict

FLOAT32 = 'float32'
BFLOAT16 = 'bfloat16'
MIXED_FLOAT16 = 'mixed_float16'
FLOAT16 = 'float16'

# `trainer_options.mixed_precision`.
TRAINING_PRECISIONS = (FLOAT32, BFLOAT16, MIXED_FLOAT16)
# `export_model.py --precision`.
SERVING_PRECISIONS = (FLOAT32, BFLOAT16, FLOAT16)

# Variables stay float32 under every policy; only the compute dtype changes.
KERAS_POLICIES: Dict[str, str] = {
    FLOAT32: 'float32',
    BFLOAT16: 'mixed_bfloat16',
    MIXED_FLOAT16: 'mixed_float16',
    FLOAT16: 'mixed_float16',
}
# float16's narrow exponent underflows small gradients: scale the loss.
LOSS_SCALED_PRECISIONS = (MIXED_FLOAT16,)

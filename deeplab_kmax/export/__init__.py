"""Deployment: SavedModel for TF Serving, REST helpers, ONNX, TFLite.

  serving          the tf.Module with signatures and in-graph pre- and
                   post-processing
  saved_model      all-or-nothing SavedModel writing; loading with metadata
  model_loading    config + checkpoint -> model with every weight restored
  rest_api         TF Serving REST request/response bodies and a client
  onnx_export      tf2onnx conversion of network + merge; onnxruntime
                   predictor
  tflite_export    TFLite conversion of network + merge; interpreter predictor
  export_cli       the command line (`kmax-export`, trainer/export_model.py)
"""

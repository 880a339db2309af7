"""DeepLab2-format data: descriptors, TFRecord conversion, input pipeline.

  dataset_info        dataset descriptors (built-in and JSON/textproto files)
  label_space         semantic ids, void, things/stuff, class-head order
  panoptic_conversion COCO-format panoptic -> DeepLab2 labels -> TFRecords
  tfrecord_codec      DeepLab2's Example format (keys, encode, decode)
  input_pipeline      create_dataset(DatasetOptions, is_training, context)
  sample_generator    augmentation + loss targets per example
  demo_dataset        the synthetic demo dataset
"""

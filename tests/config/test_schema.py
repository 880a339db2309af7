"""The schema accepts DeepLab2's configs and keeps DeepLab2's defaults."""

import pytest

from deeplab_kmax import config as config_lib
from deeplab_kmax.config import config_pb2


def test_every_reference_config_parses(reference_configs):
  assert len(reference_configs) == 17
  for name, path in reference_configs.items():
    config = config_lib.load_config(path)
    assert config.HasField('model_options'), name
    assert list(config.train_dataset_options.crop_size), name
    if config.train_dataset_options.file_pattern:
      # ${...} placeholders are plain strings to the parser.
      assert list(config.train_dataset_options.file_pattern) == [
          '${TRAIN_SET}'], name


def test_reference_configs_select_kmax(reference_configs):
  for name, path in reference_configs.items():
    model = config_lib.load_config(path).model_options
    assert model.backbone.name.startswith('kmax_'), name
    assert model.WhichOneof('meta_architecture') == 'max_deeplab', name


def test_ade20k_convnext_large_sets_decoder_drop_path(reference_configs):
  path = reference_configs['ade20k_kmax_meta_convnext_large_os32.textproto']
  max_deeplab = config_lib.load_config(path).model_options.max_deeplab
  assert max_deeplab.HasField('transformer_decoder_drop_path_keep_prob')
  assert max_deeplab.transformer_decoder_drop_path_keep_prob == 1.0
  assert max_deeplab.instance_discrimination_sample_k == 1024


def test_reference_values_are_read(reference_configs):
  config = config_lib.load_config(
      reference_configs['cityscapes_kmax_meta_r50_os32.textproto'])
  train = config.train_dataset_options
  assert list(train.crop_size) == [1025, 2049]
  copy_paste = train.augmentations.panoptic_copy_paste
  assert copy_paste.panoptic_copy_paste_void_option == 'none'
  assert train.max_thing_id == 256
  assert config.trainer_options.loss_options.semantic_loss.top_k_percent == (
      pytest.approx(0.2))
  maskwise = config.evaluator_options.maskwise_postprocessing
  assert maskwise.overlapping_threshold == pytest.approx(0.9)
  assert maskwise.reorder_mask_weight == 0.0


def test_solver_defaults_match_deeplab2():
  solver = config_pb2.SolverOptions()
  assert solver.use_sync_batchnorm is True
  assert solver.batchnorm_momentum == pytest.approx(0.99)
  assert solver.batchnorm_epsilon == pytest.approx(0.001)
  assert solver.learning_policy == 'poly'
  assert solver.poly_learning_power == pytest.approx(0.9)
  assert solver.poly_end_learning_rate == 0.0
  assert solver.base_learning_rate == pytest.approx(1e-3)
  assert solver.optimizer == 'adam'
  assert solver.warmup_steps == 0
  assert solver.training_number_of_steps == 60000
  assert solver.backbone_learning_rate_multiplier == 1.0
  assert solver.clip_gradient_norm == 10.0


def test_dataset_model_evaluator_defaults_match_deeplab2():
  dataset = config_pb2.DatasetOptions()
  assert dataset.batch_size == 32
  assert dataset.augmentations.min_scale_factor == 1.0
  assert dataset.augmentations.scale_factor_step_size == 0.25
  assert dataset.small_instance_threshold == 4096
  assert dataset.small_instance_weight == 3.0
  assert dataset.max_thing_id == 128
  assert dataset.decode_groundtruth_label is True
  model = config_pb2.ModelOptions()
  assert model.backbone.name == 'resnet50'
  assert model.backbone.output_stride == 32
  assert model.backbone.drop_path_schedule == 'constant'
  assert model.decoder.decoder_conv_type == 'depthwise_separable_conv'
  assert model.restore_semantic_last_layer_from_initial_checkpoint is True
  assert model.restore_class_last_layer_from_initial_checkpoint is True
  evaluator = config_pb2.EvaluatorOptions()
  assert evaluator.eval_steps == -1
  assert evaluator.eval_interval == 5000
  assert evaluator.pixel_confidence_threshold == pytest.approx(0.4)
  assert evaluator.transformer_class_confidence_threshold == pytest.approx(0.7)
  assert evaluator.raw_panoptic_format == 'two_channel_png'


# Field numbers shared with DeepLab2: binary protos must stay interchangeable.
_DEEPLAB2_FIELD_NUMBERS = {
    config_pb2.ExperimentOptions: {
        'experiment_name': 1, 'model_options': 2, 'trainer_options': 3,
        'train_dataset_options': 4, 'evaluator_options': 5,
        'eval_dataset_options': 6},
    config_pb2.ModelOptions: {
        'backbone': 1, 'decoder': 2, 'initial_checkpoint': 6,
        'restore_semantic_last_layer_from_initial_checkpoint': 8,
        'max_deeplab': 10},
    config_pb2.SolverOptions: {
        'use_sync_batchnorm': 1, 'base_learning_rate': 3, 'optimizer': 7,
        'training_number_of_steps': 11, 'batchnorm_momentum': 14,
        'batchnorm_epsilon': 15, 'backbone_learning_rate_multiplier': 16},
    config_pb2.LossOptions: {
        'semantic_loss': 1, 'pq_style_loss': 6,
        'mask_id_cross_entropy_loss': 7, 'instance_discrimination_loss': 8},
    config_pb2.DatasetOptions: {
        'crop_size': 4, 'augmentations': 8, 'thing_id_mask_annotations': 15,
        'max_thing_id': 16},
    config_pb2.EvaluatorOptions: {
        'stuff_area_limit': 6, 'thing_area_limit': 19,
        'pixel_confidence_threshold': 21},
}


@pytest.mark.parametrize('message', list(_DEEPLAB2_FIELD_NUMBERS),
                         ids=lambda m: m.DESCRIPTOR.name)
def test_field_numbers_match_deeplab2(message):
  fields = message.DESCRIPTOR.fields_by_name
  for name, number in _DEEPLAB2_FIELD_NUMBERS[message].items():
    assert fields[name].number == number, name


def test_extensions_cannot_collide_with_deeplab2_numbers():
  extensions = [
      config_pb2.ModelOptions.MaXDeepLabOptions.DESCRIPTOR.fields_by_name[
          'transformer_decoder_drop_path_keep_prob'],
      config_pb2.ModelOptions.DESCRIPTOR.fields_by_name[
          'restore_class_last_layer_from_initial_checkpoint'],
      config_pb2.DatasetOptions.DESCRIPTOR.fields_by_name['dataset_descriptor'],
  ]
  for field in extensions:
    assert field.number >= 100, field.full_name


def test_binary_round_trip_keeps_unknown_deeplab2_fields():
  # A DeepLab2 binary proto may carry fields this schema leaves out (e.g.
  # Panoptic-DeepLab's center_score_threshold = 7); they must survive.
  evaluator = config_pb2.EvaluatorOptions(thing_area_limit=3)
  wire = evaluator.SerializeToString() + bytes([7 << 3 | 5]) + b'\x00\x00\x80?'
  parsed = config_pb2.EvaluatorOptions.FromString(wire)
  assert parsed.thing_area_limit == 3
  assert parsed.SerializeToString() == wire


def test_demo_and_custom_dataset_names_are_accepted():
  config = config_lib.parse_config(
      'train_dataset_options { dataset: "demo_panoptic" '
      'dataset_descriptor: "/data/my_dataset.textproto" }')
  assert config.train_dataset_options.dataset == 'demo_panoptic'
  assert (config.train_dataset_options.dataset_descriptor ==
          '/data/my_dataset.textproto')


def test_transformer_decoder_keep_prob_follows_deeplab2_when_unset():
  unset = config_pb2.ModelOptions()
  unset.max_deeplab.SetInParent()
  resolve = config_lib.transformer_decoder_drop_path_keep_prob
  assert resolve(unset, 'coco_panoptic') == pytest.approx(0.8)
  assert resolve(unset, 'cityscapes_panoptic') == pytest.approx(0.8)
  assert resolve(unset, 'ade20k_panoptic') == 1.0
  assert resolve(unset, 'demo_panoptic') == pytest.approx(0.8)
  explicit = config_pb2.ModelOptions()
  explicit.max_deeplab.transformer_decoder_drop_path_keep_prob = 0.5
  assert resolve(explicit, 'coco_panoptic') == 0.5

"""The input pipeline: sources, the reference's transforms, and grain pipelines.

* :mod:`twins_jax.data.sources`: random-access sources (TFDS ``data_source``, image folders,
  in-memory arrays, scikit-learn digits);
* :mod:`twins_jax.data.transforms`: torchvision-parity transforms, as functions and as grain
  transforms;
* :mod:`twins_jax.data.pipeline`: the training pipeline (every batch a pure function of
  ``(seed, step)``, each host reading its own rows) and the evaluation pipeline (every
  example once, padded and masked);
* :mod:`twins_jax.data.datasets`: a config to train / val / test sources.
"""

from twins_jax.data.datasets import (DATASETS, LOW_RES_DATASETS, TFDS_DATASETS, Datasets,
                                     build_datasets, check_val_fraction, split_train_val)
from twins_jax.data.pipeline import (LAST_BATCH, Batches, TrainPlan, epoch_permutation,
                                     eval_pipeline, host_rows, num_eval_batches, train_pipeline)
from twins_jax.data.sources import (DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, IMAGE_EXTENSIONS,
                                    ArraySource, ConcatSource, DatasetNotPreparedError,
                                    FolderSource, SubsetSource, TfdsSource, digits_source,
                                    digits_splits, folder_classes, load_digits_arrays,
                                    upsample_nearest)
from twins_jax.data.transforms import (AUGMENTATIONS, CIFAR_PAD, RRC_RATIO, RRC_SCALE,
                                       EvalTransform, TrainTransform, center_crop, cifar_crop_flip,
                                       default_resize_size, example_rng, random_resized_crop_params,
                                       resize_shorter_side, shorter_side_size, transform)

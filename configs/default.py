"""Defaults shared by every preset: the reference TWINS-AT settings on CIFAR-10.

Every preset imports this and overrides a few fields, so no field is defined twice.
Override anything on the command line, typed: ``--config.num_epochs=10``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = 'train'  # 'train', or 'eval' (evaluate config.pretrained / the workdir's best model)
  c.method = 'twins_at'  # twins_at | twins_trades | at | trades

  # Model: the ImageNet Linf eps 4/255 robust ResNet-50 (twins-reference.md section 3).
  c.arch = 'resnet50'
  c.pretrained = ''  # PyTorch checkpoint (file or hf://ORG/REPO/FILE; ported on the fly) or model dir
  c.resize = 224  # nearest upsampling inside the model (0: none)
  c.share_affine = False  # reference: one BN affine pair per branch
  c.dtype = 'float32'  # computation dtype ('bfloat16' is an option; BN statistics stay fp32)
  # Speed levers (BENCHMARKS.md). Same function either way, different rounding.
  c.conv_impl = 'auto'  # 'auto' (matrix products for small CPU convolutions), 'xla', 'matmul'
  c.fold_bn_attack = False  # attack the Adaptive Net with its eval BN folded into the convs

  # Data.
  c.dataset = 'cifar10'
  c.data_dir = ''  # TFDS data_dir ('' for TFDS's default)
  c.folder_train = ''
  c.folder_test = ''
  c.digits_classes = ()  # for the 'digits' dataset: the classes to keep (empty: all)
  # The reference's protocol: every training image, the last partial batch kept, the final
  # model reported. val_fraction > 0 holds that fraction of the training split out to
  # choose a best model (best_model/) by validation PGD accuracy.
  c.val_fraction = 0.0
  c.last_batch = 'partial'  # 'partial' (reference: drop_last=False) or 'drop'
  c.augment = ''  # '' picks the dataset's reference augmentation (cifar / imagenet / none)
  c.image_size = 0  # 0 picks the dataset's default (32 for CIFAR, 224 otherwise)
  # Input pipeline (grain): worker processes (-1: none on CPU, one per core otherwise) and
  # threads per process. Every batch is the same whatever these are.
  c.data_workers = -1
  c.data_threads = 2
  c.skip_bad_images = False  # True: leave out images that cannot be decoded (and log them)

  # Optimisation (section 2 and 3): SGD, momentum 0.9, coupled weight decay.
  c.batch_size = 128
  c.num_epochs = 60
  c.lr = 0.003
  c.weight_decay = 1e-5
  c.momentum = 0.9
  c.lr_milestones = (30, 50)  # epochs; the lr is multiplied by lr_gamma at each
  c.lr_gamma = 0.1
  c.lambda_twins = 1.0
  c.beta = 6.0  # TRADES objectives

  # Training attack: Linf PGD-10 against the Adaptive Net (eval mode). The official scripts
  # pass eps 0.0314 (-e 0.0314, train.sh) and alpha 0.00784 (argument.py's default), i.e.
  # 8/255 and 2/255 rounded; docs/fidelity.md.
  c.norm = 'Linf'
  c.eps = 0.0314
  c.alpha = 0.00784
  c.attack_steps = 10
  c.random_start = True
  c.attack_loss = 'ce'  # 'kl': TRADES-style KL-PGD for the TRADES objectives (an option)

  # Evaluation.
  c.eval_batch_size = 256
  c.eval_every_epochs = 1
  c.eval_attack_steps = 10
  c.eval_random_start = False  # the reference's test(): PGD from the clean image
  c.autoattack = 'none'  # 'none' | 'fast' | 'standard' (final report and mode=eval)
  c.autoattack_max_examples = 0  # 0: the whole test set
  # Examples per AutoAttack chunk: the unit of progress saved in workdir/autoattack/ (a killed
  # evaluation resumes from the last finished chunk) and of the work shared among processes.
  c.autoattack_chunk = 1000
  c.sanity_examples = 1000  # test examples for the eps-curve sanity check (0: all)

  # Run.
  c.seed = 0
  c.log_every_steps = 50
  c.checkpoint_every_steps = 0  # 0: at the end of every epoch
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  # Persistent XLA compilation cache, so a resumed or repeated run skips compiling:
  # '' = <workdir>/jax_cache, 'none' = off, or a directory shared by several runs.
  c.compilation_cache_dir = ''
  # A jax.profiler trace of this many training steps (after the first, compiled, step) in
  # <workdir>/profile, for TensorBoard's profile tab (0: off).
  c.profile_steps = 0
  return c

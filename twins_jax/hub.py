"""``hf://ORG/REPO/FILE``: checkpoints on the Hugging Face Hub, wherever a checkpoint path goes.

``hf://madrylab/robust-imagenet-models/resnet50_linf_eps4.0.ckpt`` names the file
``resnet50_linf_eps4.0.ckpt`` of the model repository ``madrylab/robust-imagenet-models``
(``hf://ORG/REPO@REVISION/FILE`` pins a branch, tag or commit; ``FILE`` may contain
``/``). :func:`resolve` turns it into a local path with ``huggingface_hub.hf_hub_download``:
the first use downloads the file into the Hugging Face cache (``HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``), later uses read the cache. ``HF_HUB_OFFLINE=1`` never touches
the network. Any other path is returned unchanged.

``huggingface_hub`` is an optional dependency (``pip install huggingface_hub``, or the
``hf`` extra); it is imported only when an ``hf://`` path is used. Every failure (the
package missing, no network and no cached copy, no such repository or file) is a
:class:`twins_jax.errors.CheckpointError` with a one-line message.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple, Optional

from twins_jax.errors import CheckpointError

PREFIX = 'hf://'
INSTALL_HINT = "pip install huggingface_hub (or pip install 'twins-jax[hf]')"


class HubFile(NamedTuple):
  repo_id: str  # 'ORG/REPO'
  filename: str  # the path inside the repository
  revision: Optional[str]  # None: the default branch


def is_hf_uri(path) -> bool:
  return isinstance(path, str) and path.startswith(PREFIX)


def parse(uri: str) -> HubFile:
  """``'hf://ORG/REPO[@REVISION]/FILE'`` -> :class:`HubFile`."""
  if not is_hf_uri(uri):
    raise CheckpointError(f'{uri!r} is not an {PREFIX} path.')
  parts = uri[len(PREFIX):].split('/')
  if len(parts) < 3 or not all(parts):
    raise CheckpointError(f'{uri!r} is not a Hugging Face file: write {PREFIX}ORG/REPO/FILE '
                          f'(e.g. {PREFIX}madrylab/robust-imagenet-models/'
                          'resnet50_linf_eps4.0.ckpt), optionally ORG/REPO@REVISION.')
  repo, _, revision = parts[1].partition('@')
  if not repo or (revision == '' and '@' in parts[1]):
    raise CheckpointError(f'{uri!r}: empty repository name or revision.')
  return HubFile(f'{parts[0]}/{repo}', '/'.join(parts[2:]), revision or None)


def _env_true(name: str) -> bool:
  return os.environ.get(name, '').strip().upper() in ('1', 'ON', 'YES', 'TRUE')


def _cache_dir() -> Optional[str]:
  # Read at call time: huggingface_hub reads its environment once, when it is imported.
  return os.environ.get('HF_HUB_CACHE') or None


def resolve(path):
  """The local file ``path`` names: an ``hf://`` path is downloaded (or found in the Hugging
  Face cache); anything else is returned unchanged."""
  if not is_hf_uri(path):
    return path
  ref = parse(path)
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    from huggingface_hub import errors as hf_errors  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f'{path} is on the Hugging Face Hub, which needs the huggingface_hub '
                          f'package: {INSTALL_HINT}.') from None
  offline = _env_true('HF_HUB_OFFLINE')
  cache = _cache_dir() or huggingface_hub.constants.HF_HUB_CACHE
  download = huggingface_hub.hf_hub_download  # (imports it, which sets the logging level)
  # Without a network huggingface_hub retries for ~25 s and logs every retry (twice, once
  # more through the root logger); the one line below says what went wrong instead.
  hub_logger = logging.getLogger('huggingface_hub')
  level = hub_logger.level
  hub_logger.setLevel(logging.ERROR)
  try:
    return download(ref.repo_id, ref.filename, revision=ref.revision, cache_dir=_cache_dir(),
                    local_files_only=offline)
  except hf_errors.LocalEntryNotFoundError:
    why, fix = (('HF_HUB_OFFLINE is set',
                 'unset HF_HUB_OFFLINE and download it once') if offline else
                ('the Hub could not be reached (no network?)',
                 'download it once with network access'))
    raise CheckpointError(f'{path} is not in the Hugging Face cache ({cache}) and {why}: '
                          f'{fix}, or pass a local copy of the file instead.') from None
  except hf_errors.GatedRepoError:
    raise CheckpointError(f'{path}: the repository {ref.repo_id} is gated; accept its terms on '
                          'huggingface.co and log in (hf auth login or HF_TOKEN).') from None
  except hf_errors.RepositoryNotFoundError:
    raise CheckpointError(f'{path}: no repository {ref.repo_id} on the Hugging Face Hub (or it '
                          'is private: log in with hf auth login or HF_TOKEN).') from None
  except hf_errors.RevisionNotFoundError:
    raise CheckpointError(f'{path}: the repository {ref.repo_id} has no revision '
                          f'{ref.revision!r}.') from None
  except hf_errors.RemoteEntryNotFoundError:
    raise CheckpointError(f'{path}: the repository {ref.repo_id} has no file '
                          f'{ref.filename!r}.') from None
  except (hf_errors.HFValidationError, ValueError) as e:
    raise CheckpointError(f'{path}: {" ".join(str(e).split())}') from None
  except OSError as e:  # HTTP errors, a full disk, an unwritable cache
    raise CheckpointError(f'{path} could not be downloaded: {" ".join(str(e).split())}') from None
  finally:
    hub_logger.setLevel(level)

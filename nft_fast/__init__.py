"""nft_fast: Neural mask Fine-Tuning (NFT, ECCV 2024) backdoor purification, fast.

    import nft_fast
    sites = nft_fast.attach_masks(model, exclude=("bn1",))
    result = nft_fast.purify(model, clean_set, nft_fast.NFTConfig())
    plain = result.folded()
"""
from ._build import build_info
from .config import NFTConfig
from .errors import BackendUnavailable, CheckpointError, DataError, FolderError, NFTError, StateError
from .evaluation import evaluate
from .masks import MaskSite, attach_masks, fold_masks, mask_parameters, mask_sites
from .ops import get_backend, set_backend, use_backend
from .purifier import Purifier, PurifyResult, purify
from . import reference  # noqa: E402  (the reference NFT: the oracle of every fast path)

__version__ = "0.1.0"

__all__ = [
    "NFTConfig", "attach_masks", "mask_parameters", "mask_sites", "MaskSite", "fold_masks",
    "Purifier", "PurifyResult", "purify", "evaluate", "set_backend", "get_backend", "use_backend",
    "build_info", "reference",
    "NFTError", "DataError", "CheckpointError", "StateError", "FolderError", "BackendUnavailable",
]


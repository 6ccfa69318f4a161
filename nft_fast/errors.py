"""The exception types of nft_fast, all under one base, :class:`NFTError`.

``except nft_fast.NFTError`` catches every error the package defines; each type also
subclasses the built-in error it has always been (``ValueError`` for bad data, checkpoints,
saved states and output folders; ``RuntimeError`` for a backend that cannot run), so
``except ValueError`` keeps working. Invalid arguments (a negative step count, a tensor of
the wrong shape) raise plain ``ValueError`` / ``TypeError`` naming the argument.

The types stay importable from the modules that raise them (``nft_fast.data.DataError``,
``nft_fast.io.CheckpointError``, ``nft_fast.resume.StateError``...). The command line's
``UsageError`` (``nft_fast.app.pipeline``) is an :class:`NFTError` too.
"""
from __future__ import annotations

__all__ = ["NFTError", "DataError", "CheckpointError", "StateError", "FolderError", "Busy", "BackendUnavailable"]


class NFTError(Exception):
    """Base class of every error nft_fast defines."""


class DataError(NFTError, ValueError):
    """Data that cannot be used for purification (empty, non-finite, missing classes...)."""


class CheckpointError(NFTError, ValueError):
    """A checkpoint that cannot be (safely) loaded, or does not fit the architecture."""


class StateError(NFTError, ValueError):
    """A saved state that does not belong to the current inputs (another config, model or clean set)."""


class FolderError(NFTError, ValueError):
    """What an output folder does not allow: another command's outputs without ``overwrite``,
    an interrupted command's state without ``resume``, a state of other inputs (the command
    line prints it in one line, exit code 2)."""


class Busy(NFTError, ValueError):
    """Another live process holds an output folder's lock."""


class BackendUnavailable(NFTError, RuntimeError):
    """The requested backend was not built or cannot run on this machine."""

"""The release stages' errors (no imports: every release module may raise them without a cycle)."""

from __future__ import annotations


class ExportError(ValueError):
    """The run or evaluation folder cannot be exported as it is; the message says why and the fix."""


class MergeError(ExportError):
    """The merge was refused or failed its verification; nothing was written."""


class ShardMergeUnsupported(Exception):  # noqa: N818 - a reason to take the other path, not an error
    """The adapter or the base uses something the shard-wise merge does not handle; the message says what.
    The merge then runs in memory through peft (tasks/release/merge.py), as before."""

"""The SAMLess MS lesions Segment Editor effect (see SegmentEditorEffect.py)."""

from .SegmentEditorEffect import SegmentEditorEffect

__all__ = ["SegmentEditorEffect"]

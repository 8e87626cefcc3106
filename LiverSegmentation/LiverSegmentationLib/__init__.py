"""Slicer-side helpers of the LiverSegmentation module (no Qt)."""

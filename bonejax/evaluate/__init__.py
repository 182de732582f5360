"""Scoring and measuring segmentations: metrics, bone measures, baseline, uncertainty, reports."""

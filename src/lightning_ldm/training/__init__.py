"""Pieces shared by both training stages."""

"""Launching training jobs on a scheduler (`aift launch`)."""

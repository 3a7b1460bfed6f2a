"""Calibration and evaluation text -> token windows."""

from .text import calibration_windows, eval_windows, load_text

__all__ = ["calibration_windows", "eval_windows", "load_text"]

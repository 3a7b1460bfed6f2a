"""Quality and cost measurements: perplexity, KL divergence to a reference, time and memory."""

from .metrics import evaluate_windows, peak_device_mb, peak_rss_mb, reference_logprobs

__all__ = ["evaluate_windows", "peak_device_mb", "peak_rss_mb", "reference_logprobs"]
